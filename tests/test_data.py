"""ptm_nb.data, ptm_nb.manifest and ptm_nb.ingest: the real MedMNIST files load with their official counts, bad
input fails with a message that names the file, the field and the fix, and the three image-folder releases ingest
from their public layouts."""
import hashlib, json, os, shutil, subprocess, sys, warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ptm_nb.ingest as ingest
import ptm_nb.manifest as manifest
from ptm_nb.data import MedDataset, class_indices, dataset_report, dataset_stats, load_dataset, real_per_class
from ptm_nb.manifest import DatasetError, SPLITS, load_manifest, medmnist_info

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def raw_npz(path):
    with np.load(path) as z: return {k: z[k] for k in z.files}


def check_against_npz(ds, path, n_classes, image_shape):
    "The tensors of `ds` are the arrays of the npz: same labels, images equal to raw/255 after denormalising."
    raw = raw_npz(path)
    assert ds.n_classes == n_classes and len(ds.class_names) == n_classes
    assert ds.image_shape == image_shape and ds.channels == image_shape[0]
    for s in SPLITS:
        x, y = ds.split(s)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (len(raw[f'{s}_labels']), *image_shape)
        assert torch.equal(y, torch.from_numpy(raw[f'{s}_labels'].reshape(-1).astype(np.int64)))
    # normalised by the train split: per-channel mean 0, std 1 (exactly, up to float32 rounding)
    dims = [0] + list(range(2, ds.train_x.ndim))
    assert torch.allclose(ds.train_x.double().mean(dims), torch.zeros(ds.channels, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(ds.train_x.double().std(dims, unbiased=False), torch.ones(ds.channels, dtype=torch.float64), atol=1e-4)
    # denormalise gives back the stored uint8 images / 255 (checked on the first images of the test split)
    img = torch.from_numpy(raw['test_images'][:8]).float() / 255
    img = img.permute(0, 3, 1, 2) if (not ds.is_3d and img.ndim == 4) else img.unsqueeze(1)
    assert torch.allclose(ds.denormalise(ds.test_x[:8]), img, atol=1e-5)


@pytest.fixture
def offline(monkeypatch):
    "No network: every urlopen raises, as it does on a machine without internet."
    calls = []
    def refuse(request, timeout=None):
        calls.append(request.full_url); raise URLError('network is unreachable (simulated)')
    monkeypatch.setattr(manifest, 'urlopen', refuse)
    return calls


class FakeResponse:
    "What urlopen returns: a readable stream of `payload`."
    def __init__(self, payload): self.payload, self.pos = payload, 0
    def read(self, n=-1):
        chunk = self.payload[self.pos:] if n < 0 else self.payload[self.pos:self.pos + n]
        self.pos += len(chunk); return chunk
    def __enter__(self): return self
    def __exit__(self, *a): return False


def msg(excinfo): return str(excinfo.value)


# ---------------------------------------------------------------- acceptance on the real files

def test_breastmnist_loads_with_official_counts(need_file):
    path = need_file('breastmnist.npz')
    ds = load_dataset('breastmnist', root=path.parent)
    assert ds.counts == {'train': 546, 'val': 78, 'test': 156}
    check_against_npz(ds, path, 2, (1, 28, 28))
    assert (ds.is_3d, ds.modality, ds.size, ds.name) == (False, 'breast ultrasound', 28, 'breastmnist')
    assert ds.class_names == [medmnist_info()['breastmnist']['label'][k] for k in ('0', '1')]


def test_pneumoniamnist_loads_with_official_counts(need_file):
    path = need_file('pneumoniamnist.npz')
    ds = load_dataset('pneumoniamnist', root=path.parent)
    assert ds.counts == {'train': 4708, 'val': 524, 'test': 624}
    check_against_npz(ds, path, 2, (1, 28, 28))


def test_adrenalmnist3d_28(need_file):
    path = need_file('adrenalmnist3d.npz')
    ds = load_dataset('adrenalmnist3d', root=path.parent)
    assert ds.counts == {'train': 1188, 'val': 98, 'test': 298}
    assert ds.is_3d and ds.train_x.ndim == 5
    check_against_npz(ds, path, 2, (1, 28, 28, 28))


def test_adrenalmnist3d_64(need_file):
    "The 64^3 file (415 MB of voxels): one full load, checked without float64 copies of whole splits."
    path = need_file('adrenalmnist3d_64.npz')
    ds = load_dataset('adrenalmnist3d', root=path.parent, size=64)
    assert ds.name == 'adrenalmnist3d_64' and ds.size == 64
    assert ds.counts == {'train': 1188, 'val': 98, 'test': 298}
    assert ds.image_shape == (1, 64, 64, 64) and tuple(ds.val_x.shape) == (98, 1, 64, 64, 64)
    assert ds.train_x.dtype == torch.float32 and ds.n_classes == 2
    with np.load(path) as z:
        test_img, test_lab = z['test_images'][:4], z['test_labels'][:, 0]
    assert torch.equal(ds.test_y, torch.from_numpy(test_lab.astype(np.int64)))
    assert torch.allclose(ds.denormalise(ds.test_x[:4])[:, 0], torch.from_numpy(test_img).float() / 255, atol=1e-5)
    assert abs(ds.train_x[:64].mean().item()) < 1.0   # normalised scale (the full mean is checked at 28^3)


def test_size_suffix_and_size_argument_agree(need_file):
    root = need_file('adrenalmnist3d_64.npz').parent
    report = dataset_report(root=root, names=['adrenalmnist3d_64'])
    assert report.loc[0, 'image_shape'] == '1×64×64×64' and report.loc[0, 'name'] == 'adrenalmnist3d_64'
    with pytest.raises(DatasetError) as e: load_dataset('adrenalmnist3d_64', root=root, size=28)
    assert 'names size 64 but size=28' in msg(e)
    with pytest.raises(DatasetError) as e: load_dataset('adrenalmnist3d', root=root, size=128)
    assert 'size 128 is not offered' in msg(e) and '[28, 64]' in msg(e)


def test_pathmnist_subset1000(need_file):
    path = need_file('../custom/pathmnist_subset1000.npz')
    ds = load_dataset('pathmnist_subset1000', root=need_file('breastmnist.npz').parent)
    assert ds.counts == {'train': 701, 'val': 100, 'test': 199}
    check_against_npz(ds, path, 9, (3, 28, 28))
    assert ds.class_names == [medmnist_info()['pathmnist']['label'][str(i)] for i in range(9)]   # borrowed via like:
    assert ds.modality == 'colon pathology'
    assert hashlib.sha256(path.read_bytes()).hexdigest() == load_manifest()['pathmnist_subset1000']['sha256']


def test_env_root_is_used(need_file, monkeypatch):
    root = need_file('breastmnist.npz').parent
    monkeypatch.setenv('PTM_DATA_DIR', str(root))
    assert load_dataset('breastmnist').source == str(root / 'breastmnist.npz')


# ---------------------------------------------------------------- checksums and downloads

def test_md5_mismatch_is_refused(need_file, tmp_path, offline):
    src = need_file('breastmnist.npz')
    bad = tmp_path / 'breastmnist.npz'
    blob = bytearray(src.read_bytes()); blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(DatasetError) as e: load_dataset('breastmnist', root=tmp_path)
    m = msg(e)
    assert str(bad) in m and medmnist_info()['breastmnist']['MD5'] in m and hashlib.md5(blob).hexdigest() in m
    assert 'was not used' in m and 'Fix:' in m and "medmnist.INFO['breastmnist']['MD5']" in m
    assert offline == []          # a present file is never re-downloaded behind the user's back


def test_absent_flag_offline_says_where_to_put_it(tmp_path, offline):
    with pytest.raises(DatasetError) as e: load_dataset('octmnist', root=tmp_path, size=64)
    m = msg(e)
    url, md5 = medmnist_info()['octmnist']['url_64'], medmnist_info()['octmnist']['MD5_64']
    assert url in m and md5 in m and f'put it at exactly {tmp_path / "octmnist_64.npz"}' in m
    assert offline == [url]
    assert list(tmp_path.iterdir()) == []          # no partial download left behind
    with pytest.raises(DatasetError) as e: load_dataset('pathmnist', root=tmp_path, download=False)
    assert 'download=False' in msg(e) and str(tmp_path / 'pathmnist.npz') in msg(e) and offline == [url]


def test_download_is_verified_and_atomic(need_file, tmp_path, monkeypatch):
    payload = need_file('breastmnist.npz').read_bytes()
    urls = []
    def serve(request, timeout=None):
        assert request.get_header('User-agent') == 'ptm_nb'     # a named client, not Python's default
        urls.append(request.full_url); return FakeResponse(payload)
    monkeypatch.setattr(manifest, 'urlopen', serve)
    ds = load_dataset('breastmnist', root=tmp_path / 'new_root')      # the root is created
    assert urls == [medmnist_info()['breastmnist']['url']] and ds.counts['train'] == 546
    assert (tmp_path / 'new_root' / 'breastmnist.npz').read_bytes() == payload
    # a corrupted transfer is refused and leaves nothing behind
    monkeypatch.setattr(manifest, 'urlopen', lambda url, timeout=None: FakeResponse(payload[:-10]))
    with pytest.raises(DatasetError) as e: load_dataset('breastmnist', root=tmp_path / 'other')
    assert 'not kept' in msg(e) and medmnist_info()['breastmnist']['MD5'] in msg(e)
    assert list((tmp_path / 'other').iterdir()) == []


def test_verified_digest_is_not_recomputed(tmp_path, monkeypatch):
    import ptm_nb.io as io
    f = tmp_path / 'x.bin'; f.write_bytes(b'0123456789')
    first = io.file_digest(f, 'md5', memo=True)
    monkeypatch.setattr(io.hashlib, 'new', lambda *a: (_ for _ in ()).throw(AssertionError('rehashed')))
    manifest.check_digest(f, first, 'md5', 'the manifest', 'fix')  # same path, size, mtime: remembered
    f.write_bytes(b'0123456780'); os.utime(f, ns=(10, 10))
    with pytest.raises(AssertionError, match='rehashed'):           # changed file: hashed again
        manifest.check_digest(f, first, 'md5', 'the manifest', 'fix')


def test_import_is_light():
    "Importing ptm_nb.data, reading the manifest and INFO do not import the medmnist package (seconds, sklearn)."
    code = ('import sys, ptm_nb.data, ptm_nb.manifest as d; m = d.load_manifest(); assert "breastmnist" in m; '
            'assert "medmnist" not in sys.modules, "medmnist imported"')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
    assert manifest.medmnist_default_root() == Path.home() / '.medmnist'     # medmnist's DEFAULT_ROOT


def test_one_home_per_name():
    "The dataset layer is three modules (manifest, ingest, data); a public name is exported by one of them."
    import ptm_nb.data as data
    homes = {m.__name__: set(m.__all__) for m in (manifest, ingest, data)}
    for a in homes:
        for b in homes:
            assert a >= b or not homes[a] & homes[b], f'{a} and {b} both export {sorted(homes[a] & homes[b])}'


# ---------------------------------------------------------------- npz entries and bad arrays

def write_npz(path, n=(8, 4, 6), shape=(8, 8), n_classes=2, **override):
    arrays = {}
    for s, k in zip(SPLITS, n):
        arrays[f'{s}_images'] = np.random.default_rng(k).integers(0, 256, (k, *shape), dtype=np.uint8)
        arrays[f'{s}_labels'] = (np.arange(k) % n_classes).astype(np.uint8)[:, None]
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def npz_manifest(tmp_path, name='mine', **fields):
    entry = {'kind': 'npz', 'file': 'mine.npz', 'class_names': ['a', 'b'], **fields}
    path = tmp_path / 'user_manifest.yaml'
    path.write_text(yaml.safe_dump({'datasets': {name: entry}}))
    return path


@pytest.mark.parametrize('override, fragments', [
    ({'val_labels': None}, ["missing key(s) ['val_labels']", 'np.savez(path, train_images=']),
    ({'train_images': np.zeros((8, 8, 8), np.float32)}, ['train_images has dtype float32', 'uint8', 'astype(np.uint8)']),
    ({'test_images': np.zeros((6, 9, 9), np.uint8)}, ['test_images is (9, 9)', 'train split is (8, 8)', 'resize every split']),
    ({'val_images': np.zeros((4, 8, 8, 5), np.uint8)}, ['val_images has shape (4, 8, 8, 5)', '(N, H, W) or (N, H, W, 3)']),
    ({'train_labels': np.zeros((8, 1), np.float32)}, ['train_labels has dtype float32', 'integer class indices']),
    ({'test_labels': np.zeros((5, 1), np.uint8)}, ['test_labels has 5 rows but test_images has 6 images']),
    ({'test_labels': np.array([0, 1, 2, 0, 1, 7], np.int64)}, ['test_labels has 2 label(s) outside 0..1', 'value 2',
                                                               "2 classes ['a', 'b']", 'relabel']),
    ({'train_labels': np.eye(2, dtype=np.uint8)[np.arange(8) % 2]}, ['train_labels has shape (8, 2)', 'one class index per image']),
])
def test_bad_npz_arrays(tmp_path, monkeypatch, override, fragments):
    arrays = {k: v for k, v in override.items() if v is not None}
    path = write_npz(tmp_path / 'mine.npz', **arrays)
    if any(v is None for v in override.values()):
        raw = raw_npz(path); [raw.pop(k) for k, v in override.items() if v is None]; np.savez(path, **raw)
    monkeypatch.setenv('PTM_MANIFEST', str(npz_manifest(tmp_path)))
    with pytest.raises(DatasetError) as e: load_dataset('mine', root=tmp_path)
    assert str(path) in msg(e) and 'Fix:' in msg(e)
    for f in fragments: assert f in msg(e), (f, msg(e))


def test_npz_entry_loads_and_checks_sha256_counts_and_channels(tmp_path):
    path = write_npz(tmp_path / 'mine.npz', shape=(6, 6, 3))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    ds = load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, sha256=sha, counts={'train': 8, 'val': 4, 'test': 6}))
    assert ds.image_shape == (3, 6, 6) and ds.counts == {'train': 8, 'val': 4, 'test': 6} and ds.source == str(path)
    with pytest.raises(DatasetError) as e:
        load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, sha256='f' * 64))
    assert f'sha256 is {sha}' in msg(e) and 'user_manifest.yaml' in msg(e) and 'was not used' in msg(e)
    with pytest.raises(DatasetError) as e:
        load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, counts={'train': 9, 'val': 4, 'test': 6}))
    assert 'holds train/val/test 8/4/6' in msg(e) and "'train': 9" in msg(e)
    with pytest.raises(DatasetError) as e:
        load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, like='breastmnist', class_names=None))
    assert "3 channel(s)" in msg(e) and 'channels: 1' in msg(e)
    with pytest.raises(DatasetError) as e:
        load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, file='nowhere/x.npz'))
    assert f'put it at exactly {tmp_path / "nowhere" / "x.npz"}' in msg(e)


def test_multilabel_npz_keeps_one_column_per_class(tmp_path):
    "chestmnist is multi-label (14 binary labels): its labels stay (N, 14); class-index helpers refuse them."
    lab = lambda n: (np.arange(n * 14).reshape(n, 14) % 3 == 0).astype(np.uint8)
    write_npz(tmp_path / 'mine.npz', train_labels=lab(8), val_labels=lab(4), test_labels=lab(6))
    ds = load_dataset('mine', root=tmp_path, manifest=npz_manifest(tmp_path, like='chestmnist', class_names=None))
    assert ds.task.startswith('multi-label') and tuple(ds.train_y.shape) == (8, 14) and ds.n_classes == 14
    assert dataset_stats(ds)['class_counts']['train'] == lab(8).sum(0).tolist()
    with pytest.raises(DatasetError) as e: real_per_class(ds.train_x, ds.train_y, 14, 1, torch.Generator())
    assert 'one label per image' in msg(e)


def test_unknown_dataset_lists_close_names():
    with pytest.raises(DatasetError) as e: load_dataset('pneumonia_mnist')
    assert "unknown dataset 'pneumonia_mnist'" in msg(e) and 'Close names: pneumoniamnist' in msg(e)
    assert 'PTM_MANIFEST' in msg(e)
    with pytest.raises(DatasetError) as e: load_dataset('covid-cxr')
    assert 'covid19_cxr' in msg(e)


# ---------------------------------------------------------------- the manifest

TABLE1 = {'pathmnist': 'medmnist', 'octmnist': 'medmnist', 'organmnist3d': 'medmnist',
          'covid19_cxr': 'image_folder', 'skin_ham': 'image_folder', 'breast_uls': 'image_folder'}


def test_project_manifest_describes_table1_explicitly():
    raw = yaml.safe_load((REPO / 'data_manifest.yaml').read_text())['datasets']
    for name, kind in TABLE1.items():
        e = raw[name]
        assert e['kind'] == kind
        for f in ('title', 'table1', 'modality', 'source_url', 'licence', 'citation', 'class_names', 'channels',
                  'image_shape', 'counts', 'split'):
            assert e.get(f) not in (None, ''), (name, f)
        if kind == 'image_folder':
            assert e['size'] == 112 and e['image_shape'][1:] == [112, 112] and e['split']['rule'] == 'stratified'
            assert abs(sum(e['split']['ratios'].values()) - 1) < 1e-9 and isinstance(e['split']['seed'], int)
            assert sum(e['counts']['per_class'].values()) == e['counts']['total']
    assert [raw[n]['channels'] for n in ('covid19_cxr', 'skin_ham', 'breast_uls')] == [1, 3, 1]
    sub = raw['pathmnist_subset1000']
    assert (sub['kind'], sub['file'], sub['like']) == ('npz', '../custom/pathmnist_subset1000.npz', 'pathmnist')
    assert sub['sha256'] == 'fee1bff3925ff6dc82efb0d7d048353f4a009a48bdf7c2b52aa5469a393989d1'


def test_manifest_agrees_with_medmnist_info_and_covers_every_flag():
    entries, info = load_manifest(), medmnist_info()
    assert set(info) <= set(entries)
    for flag in info:
        meta = manifest.dataset_meta(entries[flag])        # raises if a written-out field disagrees with INFO
        assert meta['sizes'] == ([28, 64] if flag.endswith('3d') else [28, 64, 128, 224])
        assert meta['n_classes'] == len(info[flag]['label']) and meta['modality'] != 'unknown'
    for flag in ('pathmnist', 'octmnist', 'organmnist3d'):
        e = entries[flag]
        assert e['counts'] == info[flag]['n_samples']
        assert {s: m for s, m in e['md5'].items()} == {s: manifest.medmnist_source(flag, s)[1] for s in e['sizes']}


def test_user_manifest_overrides_fields_and_validation_names_file_entry_field_fix(tmp_path, monkeypatch):
    user = tmp_path / 'mine.yaml'
    user.write_text('datasets:\n  breast_uls:\n    folder: /data/BUSI\n    size: 64\n')
    monkeypatch.setenv('PTM_MANIFEST', str(user))
    e = load_manifest()['breast_uls']
    assert (e['folder'], e['size'], e['channels']) == ('/data/BUSI', 64, 1)
    cases = [('datasets:\n  breast_uls:\n    fit: squash\n', 'datasets.breast_uls.fit', 'stretch or center_crop'),
             ('datasets:\n  x:\n    kind: npz\n    file: a.npz\n    sha256: abc\n', 'datasets.x.sha256', '64-hex'),
             ('datasets:\n  x:\n    kind: folder\n', 'datasets.x.kind', 'medmnist, npz, image_folder'),
             ('datasets:\n  x:\n    kind: npz\n    file: a.npz\n    labels: [a]\n', 'datasets.x.labels', 'unknown field'),
             ('datasets:\n  skin_ham:\n    class_names: [a, a]\n', 'datasets.skin_ham.class_names', 'repeat'),
             ('sets:\n  x: {}\n', 'unknown top-level', 'datasets:'),
             ('datasets:\n  x: [1, 2\n', 'not valid YAML', 'line')]
    for i, (text, *fragments) in enumerate(cases):
        user.write_text(text); os.utime(user, ns=(100 + i, 100 + i))
        with pytest.raises(DatasetError) as e: load_manifest()
        assert str(user) in msg(e) and 'Fix' in msg(e), msg(e)
        for f in fragments: assert f in msg(e), (f, msg(e))
    user.write_text('datasets:\n  pathmnist:\n    class_names: [a, b]\n'); os.utime(user, ns=(1, 1))
    with pytest.raises(DatasetError) as e: manifest.dataset_meta(load_manifest()['pathmnist'])
    assert str(user) in msg(e) and 'datasets.pathmnist.class_names' in msg(e) and "medmnist.INFO['pathmnist']" in msg(e)


# ---------------------------------------------------------------- image folders in the layouts of the releases

GRAY = {0: 30, 1: 90, 2: 150, 3: 210}          # each class has its own flat gray level ...
RGB = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200), (120, 120, 120)]


def flat(value, size=(23, 17)):                 # ... so the label of every loaded image can be read off its pixels
    return Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8))


def make_covid(root, per_class=(5, 3, 6, 4)):
    base = root / 'COVID-19_Radiography_Dataset'
    for c, (cname, n) in enumerate(zip(['COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia'], per_class)):
        for sub in ('images', 'masks'): (base / cname / sub).mkdir(parents=True)
        for i in range(1, n + 1):
            flat((GRAY[c],) * 3).save(base / cname / 'images' / f'{cname}-{i}.png')
            Image.fromarray(np.full((17, 23), 255, np.uint8)).save(base / cname / 'masks' / f'{cname}-{i}.png')
        (base / cname / 'images' / 'Thumbs.db').write_bytes(b'not an image, wrong extension')
    (base / 'COVID.metadata.xlsx').write_bytes(b'')
    (base / 'Normal' / 'images' / 'Normal-99.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00 truncated')   # corrupt
    return base


def make_busi(root, per_class=(6, 4, 3)):
    base = root / 'Dataset_BUSI_with_GT'
    for c, (cname, n) in enumerate(zip(['benign', 'malignant', 'normal'], per_class)):
        (base / cname).mkdir(parents=True)
        for i in range(1, n + 1):
            flat((GRAY[c],) * 3).save(base / cname / f'{cname} ({i}).png')
            Image.fromarray(np.full((17, 23), 255, np.uint8)).save(base / cname / f'{cname} ({i})_mask.png')
        Image.fromarray(np.full((17, 23), 255, np.uint8)).save(base / cname / f'{cname} (1)_mask_1.png')
    return base


def make_ham(root, per_class=(3, 3, 4, 2, 4, 8, 2)):
    base = root / 'HAM10000'
    parts = [base / 'HAM10000_images_part_1', base / 'HAM10000_images_part_2']
    for p in parts: p.mkdir(parents=True)
    rows, k = ['lesion_id,image_id,dx,dx_type,age,sex,localization'], 0
    for c, (dx, n) in enumerate(zip(['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc'], per_class)):
        for i in range(n):
            k += 1
            iid, lesion = f'ISIC_{k:07d}', f'HAM_{c:02d}{i // 2:03d}'     # two images per lesion
            flat(RGB[c], size=(60, 45)).save(parts[k % 2] / f'{iid}.jpg', quality=95)
            rows.append(f'{lesion},{iid},{dx},histo,50.0,male,back')
    rows.append('HAM_9999999,ISIC_9999999,nv,histo,50.0,male,back')                 # a row without its image
    (parts[1] / 'ISIC_0000001.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')  # corrupt
    (base / 'HAM10000_metadata.csv').write_text('\n'.join(rows) + '\n')
    return base


def labels_from_pixels(ds, palette):
    "Recover each image's class from its (flat) colour and compare with its label."
    for s in SPLITS:
        x, y = ds.split(s)
        px = (ds.denormalise(x) * 255).round().flatten(2).median(2).values   # N×C
        for v, lab in zip(px, y):
            want = torch.tensor(palette[int(lab)], dtype=torch.float32)
            assert torch.allclose(v, want, atol=6), (s, v, lab)


def quiet_load(*args, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = load_dataset(*args, **kw)
    return ds, [str(x.message) for x in w]


def tree(root): return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns) for p in root.rglob('*'))


def test_covid_layout_ingest_split_cache(tmp_path, monkeypatch):
    root, cache = tmp_path / 'data', tmp_path / 'cache'
    make_covid(root)
    before = tree(root)
    ds, warns = quiet_load('COVID19-CXR', root=root, size=32, cache_dir=cache)
    assert tree(root) == before                                     # the data root is read, never written
    assert ds.name == 'covid19_cxr_32' and ds.image_shape == (1, 32, 32) and ds.channels == 1
    assert ds.class_names == ['COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia']
    assert sum(ds.counts.values()) == 18                            # masks, Thumbs.db and the corrupt file left out
    labels_from_pixels(ds, {c: (g,) for c, g in GRAY.items()})
    skipped = [w for w in warns if 'skipped' in w]
    assert len(skipped) == 1 and '1 image(s) skipped' in skipped[0] and 'Normal/images/Normal-99.png' in skipped[0]
    assert any('the manifest expects' in w for w in warns)          # 18 images is not the release's 21165
    # stratified 7:1:2 per class (round half up), recorded in the JSON beside the cache with every source file
    per_class = {n: [int((ds.split(s)[1] == c).sum()) for s in SPLITS] for c, n in enumerate(ds.class_names)}
    assert per_class == {'COVID': [3, 1, 1], 'Lung_Opacity': [2, 0, 1], 'Normal': [4, 1, 1], 'Viral Pneumonia': [3, 0, 1]}
    (npz,) = cache.glob('covid19_cxr_32px_*.npz')
    record = json.loads(npz.with_suffix('.json').read_text())
    assert record['cache_sha256'] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert record['counts']['total'] == 18 and record['skipped']['count'] == 1
    assert record['skipped']['files'][0]['file'] == 'Normal/images/Normal-99.png'
    assert {p['file'] for p in record['sources']} == {f'{n}/images/{n}-{i}.png' for n, k in
                                                      zip(ds.class_names, (5, 3, 6, 4)) for i in range(1, k + 1)}
    first = record['sources'][0]
    assert first['sha256'] == hashlib.sha256((root / 'COVID-19_Radiography_Dataset' / first['file']).read_bytes()).hexdigest()
    assert ds.info['ingest']['total'] == 18
    # reused: no image is decoded again while the listing is unchanged
    decoded, real_decode = [], ingest.decode_image
    monkeypatch.setattr(ingest, 'decode_image', lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    ds2, warns2 = quiet_load('covid19_cxr', root=root, size=32, cache_dir=cache)
    assert decoded == [] and torch.equal(ds2.train_x, ds.train_x) and any('1 image(s) skipped' in w for w in warns2)
    # a changed listing builds a new cache (and removes the stale one)
    flat((GRAY[0],) * 3).save(root / 'COVID-19_Radiography_Dataset' / 'COVID' / 'images' / 'COVID-6.png')
    ds3, _ = quiet_load('covid19_cxr', root=root, size=32, cache_dir=cache)
    assert len(decoded) == 20 and sum(ds3.counts.values()) == 19      # 19 images and the corrupt file
    assert len(list(cache.glob('covid19_cxr_32px_*.npz'))) == 1 and npz not in cache.glob('*.npz')
    # the policy "error" names the unreadable file
    with pytest.raises(DatasetError) as e:
        load_dataset('covid19_cxr', root=root, size=32, cache_dir=cache, on_unreadable='error')
    assert 'Normal-99.png' in msg(e) and 'could not be read' in msg(e) and 'on_unreadable: skip' in msg(e)


def test_busi_layout_excludes_masks_and_defaults_to_112(tmp_path, monkeypatch):
    root = tmp_path / 'data'
    make_busi(root)
    monkeypatch.setenv('PTM_DATA_DIR', str(root))
    monkeypatch.setenv('PTM_CACHE_DIR', str(tmp_path / 'cache'))
    ds, warns = quiet_load('BREAST-ULS')
    assert ds.name == 'breast_uls' and ds.image_shape == (1, 112, 112) and ds.size == 112
    assert sum(ds.counts.values()) == 13 and not any('skipped' in w for w in warns)
    labels_from_pixels(ds, {c: (g,) for c, g in GRAY.items()})
    assert list((tmp_path / 'cache').glob('breast_uls_112px_*.npz'))
    # the split is seeded: the same listing gives the same split, another seed another one
    ds_again, _ = quiet_load('breast_uls', cache_dir=tmp_path / 'cache2')
    assert torch.equal(ds_again.test_x, ds.test_x)
    other = {'datasets': {'breast_uls': {'split': {'rule': 'stratified', 'seed': 5, 'ratios': {'train': .5, 'val': 0, 'test': .5}}}}}
    ds_other, _ = quiet_load('breast_uls', manifest=other)
    assert ds_other.counts == {'train': 6, 'val': 0, 'test': 7}


def test_ham_layout_csv_labels_lesion_groups(tmp_path):
    root, cache = tmp_path / 'data', tmp_path / 'cache'
    make_ham(root)
    ds, warns = quiet_load('SKIN-HAM', root=root, size=24, cache_dir=cache)
    assert ds.image_shape == (3, 24, 24) and ds.class_names == ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']
    assert sum(ds.counts.values()) == 25                              # 26 images, one corrupt; one row has no image
    labels_from_pixels(ds, dict(enumerate(RGB)))
    w = next(w for w in warns if 'skipped' in w)
    assert '2 image(s) skipped' in w and 'ISIC_0000001' in w and 'ISIC_9999999' in w
    record = json.loads(next(cache.glob('skin_ham_24px_*.json')).read_text())
    lesion_of = {}
    for line in (root / 'HAM10000' / 'HAM10000_metadata.csv').read_text().splitlines()[1:]:
        lesion, iid = line.split(',')[:2]; lesion_of[iid] = lesion
    splits_of = {}
    for src in record['sources']: splits_of.setdefault(lesion_of[Path(src['file']).stem], set()).add(src['split'])
    assert all(len(s) == 1 for s in splits_of.values())               # one lesion, one split
    assert {s for v in splits_of.values() for s in v} == {'train', 'test', 'val'}


def test_image_folder_errors_name_file_and_fix(tmp_path):
    root, cache = tmp_path / 'data', tmp_path / 'cache'
    with pytest.raises(DatasetError) as e: load_dataset('covid19_cxr', root=root, cache_dir=cache)
    assert str(root / 'COVID-19_Radiography_Dataset') in msg(e) and 'kaggle.com' in msg(e) and 'Fix:' in msg(e)
    base = make_busi(root)
    shutil.rmtree(base / 'normal')
    with pytest.raises(DatasetError) as e: load_dataset('breast_uls', root=root, cache_dir=cache)
    assert str(base / 'normal') in msg(e) and "class 'normal'" in msg(e)
    ham = make_ham(root)
    table = ham / 'HAM10000_metadata.csv'
    table.write_text(table.read_text().replace(',nv,', ',nevus,', 1))
    with pytest.raises(DatasetError) as e: load_dataset('skin_ham', root=root, cache_dir=cache)
    assert str(table) in msg(e) and "dx='nevus'" in msg(e) and 'line ' in msg(e)
    table.write_text(table.read_text().replace('lesion_id,image_id,dx', 'lesion_id,image,dx', 1))
    with pytest.raises(DatasetError) as e: load_dataset('skin_ham', root=root, cache_dir=cache)
    assert "['image_id'] missing" in msg(e)
    with pytest.raises(DatasetError) as e: load_dataset('breast_uls', root=root, cache_dir=root / 'cache')
    assert 'inside the data root' in msg(e) and 'PTM_CACHE_DIR' in msg(e)


# ---------------------------------------------------------------- helpers every later module uses

def test_real_per_class_balanced_sorted_reproducible():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)[torch.randperm(15, generator=torch.Generator().manual_seed(3))]
    x = torch.arange(15, dtype=torch.float32).view(15, 1, 1, 1).expand(15, 1, 2, 2).clone()
    xs, ys = real_per_class(x, y, 3, 3, torch.Generator().manual_seed(0))
    assert ys.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    picked = xs[:, 0, 0, 0].long()
    assert torch.equal(y[picked], ys) and len(set(picked.tolist())) == 9          # real, distinct, of the right class
    xs2, _ = real_per_class(x, y, 3, 3, torch.Generator().manual_seed(0))
    assert torch.equal(xs, xs2)
    draws = {tuple(real_per_class(x, y, 3, 1, torch.Generator().manual_seed(s))[0][:, 0, 0, 0].tolist()) for s in range(20)}
    assert len(draws) > 5                                                          # the generator matters
    assert [len(i) for i in class_indices(y, 3)] == [5, 3, 7]
    with pytest.raises(DatasetError) as e: real_per_class(x, y, 3, 4, torch.Generator())
    assert 'ipc=4 is larger than class 1' in msg(e) and '3 image(s)' in msg(e) and 'ipc <= 3' in msg(e)
    with pytest.raises(DatasetError): real_per_class(x, y, 3, 0, torch.Generator())


def test_dataset_to_and_denormalise_follow_device(need_file):
    ds = load_dataset('breastmnist', root=need_file('breastmnist.npz').parent)
    moved = ds.to('meta')
    assert moved.train_x.device.type == 'meta' and moved.mean.device.type == 'meta' and ds.train_x.device.type == 'cpu'
    assert ds.denormalise(ds.train_x[:2].double()).dtype == torch.float64
    assert 'breastmnist' in repr(ds) and '546/78/156' in repr(ds)


def test_dataset_stats_and_report_from_the_data(need_file, tmp_path):
    root = need_file('breastmnist.npz').parent
    ds = load_dataset('breastmnist', root=root)
    st = dataset_stats(ds)
    raw = raw_npz(root / 'breastmnist.npz')
    train_counts = np.bincount(raw['train_labels'][:, 0], minlength=2)
    majority = 100 * (raw['test_labels'][:, 0] == train_counts.argmax()).mean()
    assert st['class_counts']['train'] == train_counts.tolist() and abs(st['majority_test_acc'] - majority) < 1e-9
    assert round(st['majority_test_acc'], 1) == 73.1                          # the floor METHOD.md quotes
    assert (st['dims'], st['classes'], st['image_shape'], st['modality']) == ('2D', 2, '1×28×28', 'breast ultrasound')
    report = dataset_report(root=root)
    assert (report.status == 'ok').all()
    present = {p.name for p in root.glob('*.npz')}
    expected = {f[:-4] for f in present}
    if (root / '../custom/pathmnist_subset1000.npz').exists(): expected.add('pathmnist_subset1000')
    assert set(report.name) == expected                                      # every present file, nothing else
    row = report.set_index('name').loc['breastmnist']
    assert (row.train, row.val, row.test, row.classes, row.majority_test_acc) == (546, 78, 156, 2, 73.1)
    text = report.to_string(index=False)
    assert 'breastmnist' in text and 'NaN' not in text
    # a requested broken file raises; a broken one found while listing gets an error status
    broken = tmp_path / 'breastmnist.npz'
    blob = bytearray((root / 'breastmnist.npz').read_bytes()); blob[100] ^= 1; broken.write_bytes(bytes(blob))
    with pytest.raises(DatasetError) as e: dataset_report(root=tmp_path, names=['breastmnist'])
    assert 'md5 is' in msg(e) and str(broken) in msg(e)
    listed = dataset_report(root=tmp_path, include_absent=True).set_index('name')
    assert listed.loc['breastmnist', 'status'].startswith('error:') and listed.loc['octmnist', 'status'] == 'absent'
    assert listed.loc['octmnist', 'source'] == str(tmp_path / 'octmnist.npz')
