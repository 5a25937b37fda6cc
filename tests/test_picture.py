"""Every run writes a picture of its synthetic set, `synset.png`, beside `synset.pt`: one row per class, one
column per image, a 3D image as its three central slices. Smoke runs of the `random` method (no experts, a
few seconds each), on the Agg backend."""
import matplotlib
matplotlib.use('Agg')
import pytest
from PIL import Image
import ptm_nb.picture as picture
from ptm_nb.data import load_dataset
from ptm_nb.runs import RunSpec, run

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('dataset, slices', [('breastmnist', 1), ('adrenalmnist3d', 3)])
def test_a_run_writes_its_picture(tmp_path, data_dir, dataset, slices):
    ds = load_dataset(dataset, root=data_dir, download=False)
    res = run(RunSpec('random', dataset, 2, 'smoke', device='cpu'), root=tmp_path, dataset=ds, progress=False)
    png = res.folder.path / 'synset.png'
    assert png.stat().st_size > 0 and [p.name for p in res.folder.path.glob('*.png')] == ['synset.png']
    with Image.open(png) as im: (w, h), fmt = im.size, im.format
    assert fmt == 'PNG'
    # 2 classes × 2 images of 28 px, 2 px apart; a 3D tile is its three slices 1 px apart
    tile_w = slices * 28 + (slices - 1)
    grid = (2 * (28 + 2) + 2, 2 * (tile_w + 2) + 2)
    mosaic = picture.synset_mosaic(res.synset.images, res.synset.labels, ds.mean, ds.std, ds.n_classes)
    assert mosaic.shape[:2] == grid
    zoom = w // grid[1]
    assert zoom >= 1 and (h, w) == (grid[0] * zoom, grid[1] * zoom)       # the grid, zoomed pixel for pixel
    assert abs(w / h - slices) < 0.15 * slices                                 # square in 2D, 3 : 1 in 3D


def test_a_failed_picture_does_not_fail_the_run(tmp_path, data_dir, monkeypatch):
    def broken(*args, **kwargs): raise RuntimeError('no backend')
    monkeypatch.setattr(picture, 'save_synset_png', broken)
    ds = load_dataset('breastmnist', root=data_dir, download=False)
    with pytest.warns(UserWarning, match=r'synset\.png.*no backend.*the run goes on'):
        res = run(RunSpec('random', 'breastmnist', 2, 'smoke', device='cpu'), root=tmp_path, dataset=ds,
                  progress=False)
    assert (res.folder.path / 'eval.json').exists() and not (res.folder.path / 'synset.png').exists()
