"""DC, DSA (ptm_nb.baselines.gm) and DM (ptm_nb.baselines.dm) on real data at smoke scale: the objective goes down,
the result has the right shape and is reproducible from the seed, small classes, 3 channels, batch norm, the NaN
guard, resume, bad hyper-parameters, and `run` end to end."""
import math
from types import SimpleNamespace
import pytest
import torch
import ptm_nb.baselines.gm as gm                 # registers 'dc' and 'dsa'
import ptm_nb.baselines.dm as dm                 # registers 'dm'
from ptm_nb.augment import DSAConfig
from ptm_nb.baselines.common import ClassBatches, baseline_net
from ptm_nb.data import load_dataset
from ptm_nb.distill import RunFolder, get_method, initial_images
from ptm_nb.runs import RunSpec, run

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py
METHODS = ['dc', 'dsa', 'dm']
FILES = {'breastmnist': 'breastmnist.npz', 'adrenalmnist3d': 'adrenalmnist3d.npz',
         'pathmnist_subset1000': '../custom/pathmnist_subset1000.npz'}
_loaded = {}


@pytest.fixture
def dataset(need_file, data_dir):
    "Load a real dataset once per test session (skipped, naming the file, when it is absent)."
    def _get(name):
        need_file(FILES[name])
        if name not in _loaded: _loaded[name] = load_dataset(name, root=data_dir, download=False)
        return _loaded[name]
    return _get


def smoke_hp(method, name, ipc=2, **overrides):
    "The method's resolved smoke-scale row plus the net, as `run` hands it to the method."
    cfg = RunSpec(method, name, ipc, 'smoke', overrides=overrides).resolve()
    return {**cfg['hp'], 'net': cfg['net'], 'net_options': cfg['net_options']}


def fixed_objective(method, ds, hp, images, ipc, k=2):
    "The method's own objective on k nets, real batches and siamese draws drawn from a fixed seed the run never used."
    g, total = torch.Generator().manual_seed(999), 0.0
    batches = ClassBatches(ds.train_x, ds.train_y, ds.n_classes)
    for _ in range(k):
        net = baseline_net(ds, hp, g)
        reals = [batches.batch(c, hp['batch_real'], g) for c in range(ds.n_classes)]
        draws = [gm.siamese_draw(DSAConfig(hp['dsa']), max(hp['batch_real'], ipc), len(ds.image_shape) - 1, g)
                 for _ in range(ds.n_classes)]
        if method == 'dm': total += float(dm.dm_objective(net.requires_grad_(False), images, ipc, reals, draws))
        else: total += float(gm.gm_objective(net, images, ipc, reals, draws, hp['distance']).detach())
    return total / k


def check_synset(s, ds, ipc):
    assert s.images.shape == (ds.n_classes * ipc, *ds.image_shape) and s.images.dtype == torch.float32
    assert s.labels.tolist() == torch.arange(ds.n_classes).repeat_interleave(ipc).tolist()      # class-major
    assert torch.isfinite(s.images).all() and math.isfinite(s.lr) and s.lr > 0


@pytest.mark.parametrize('name', ['breastmnist', 'adrenalmnist3d'])
@pytest.mark.parametrize('method', METHODS)
def test_smoke_lowers_objective_and_is_reproducible(dataset, method, name):
    # Started from noise (DC's default; an override for DSA and DM): from real images the objective starts near
    # its floor and two smoke iterations move it by less than it varies between held-out nets, so the comparison
    # would not be decisive. Measured on seeds 0-3, 2D and 3D: DC/DSA 0.1-2.3 % lower (every seed), DM 18-50 %.
    ds = dataset(name)
    hp = smoke_hp(method, name, init='noise')
    fn = get_method(method).fn
    out = fn(ds, 2, hp, None, 0, 'cpu', None, False)
    check_synset(out, ds, 2)
    start, _ = initial_images(ds.train_x, ds.train_y, ds.n_classes, 2, 'noise', torch.Generator().manual_seed(0))
    before, after = fixed_objective(method, ds, hp, start, 2), fixed_objective(method, ds, hp, out.images, 2)
    assert after < before, f'{method} on {name}: objective {before:.4f} -> {after:.4f}'
    assert torch.equal(fn(ds, 2, hp, None, 0, 'cpu', None, False).images, out.images)
    other = fn(ds, 2, {**hp, 'iterations': 1}, None, 1, 'cpu', None, False)    # (one iteration is enough to differ)
    assert not torch.equal(other.images, out.images)


@pytest.mark.parametrize('method', METHODS)
def test_three_channels_nine_classes(dataset, method):
    ds = dataset('pathmnist_subset1000')
    check_synset(get_method(method).fn(ds, 2, smoke_hp(method, 'pathmnist_subset1000', iterations=1), None, 0,
                                       'cpu', None, False), ds, 2)


def tiny(shape=(1, 10, 10), sizes=(12, 3), seed=0):
    "A dataset whose classes have `sizes` images (class c: a bright square at position c)."
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = torch.randn(len(y), *shape, generator=g) * 0.3
    for c in range(len(sizes)): x[y == c, :, 2 * c:2 * c + 3, 2 * c:2 * c + 3] += 2
    return SimpleNamespace(name='tiny', train_x=x, train_y=y, val_x=x, val_y=y, test_x=x, test_y=y,
                           n_classes=len(sizes), image_shape=tuple(shape), channels=shape[0], is_3d=len(shape) == 4)


TINY_NET = {'net': 'convnet', 'net_options': {'width': 4, 'depth': 2}}


@pytest.mark.parametrize('method', METHODS)
def test_class_smaller_than_batch_real(method, caplog):
    ds = tiny(sizes=(20, 3))                               # class 1 has 3 images, the batch asks for 16
    hp = {**smoke_hp(method, 'tiny', batch_real=16, iterations=2), **TINY_NET}
    out = get_method(method).fn(ds, 2, hp, None, 0, 'cpu', None, False)
    check_synset(out, ds, 2)
    assert out.provenance['short_classes'] == {1: 16}
    assert 'class 1 has 3 images, fewer than the batch of 16' in caplog.text


@pytest.mark.parametrize('method', METHODS)
def test_batchnorm_and_3d_nets(method):
    # a batch-norm net (DC/DSA freeze its statistics from real images; DM embeds all classes at once) and a 3D tiny set
    for ds, net_options in [(tiny(), {'width': 4, 'depth': 2, 'norm': 'batch'}), (tiny((1, 6, 6, 6)), {'width': 4, 'depth': 1})]:
        inner_loop_too = {} if method == 'dm' else {'loops': {1: [2, 2]}}
        hp = {**smoke_hp(method, 'tiny', **inner_loop_too), **TINY_NET, 'net_options': net_options}
        check_synset(get_method(method).fn(ds, 2, hp, None, 0, 'cpu', None, False), ds, 2)


@pytest.mark.parametrize('method', ['dc', 'dm'])
def test_resume_after_interruption(dataset, tmp_path, method):
    ds = dataset('breastmnist')
    hp = smoke_hp(method, 'breastmnist', iterations=4, checkpoint_every=1,
                  **({'loops': {1: [2, 2]}} if method == 'dc' else {}))    # the inner loop runs too
    net, opts = hp.pop('net'), hp.pop('net_options')
    distill, cfg = (gm.distill_gm, gm.GMConfig(**hp)) if method == 'dc' else (dm.distill_dm, dm.DMConfig(**hp))
    whole = distill(ds, 2, cfg, seed=3, run=RunFolder(tmp_path / 'whole'), net=net, net_options=opts, progress=False)

    class Stop(Exception): pass
    def stop_at_2(it, images):
        if it == 2: raise Stop
    with pytest.raises(Stop):
        distill(ds, 2, cfg, seed=3, run=RunFolder(tmp_path / 'cut'), net=net, net_options=opts, progress=False,
                on_iteration=stop_at_2)
    assert RunFolder(tmp_path / 'cut').load_checkpoint()['state']['iteration'] == 2
    resumed = distill(ds, 2, cfg, seed=3, run=RunFolder(tmp_path / 'cut'), net=net, net_options=opts, progress=False)
    assert torch.equal(resumed.images, whole.images)
    logged = RunFolder(tmp_path / 'cut').metrics()
    assert [r['iteration'] for r in logged] == [1, 2, 3, 4] and all(r['wall_s'] > 0 for r in logged)


@pytest.mark.parametrize('method', METHODS)
def test_non_finite_objective_never_reaches_the_images(method, monkeypatch, tmp_path):
    module, name = (dm, 'dm_objective') if method == 'dm' else (gm, 'gm_objective')
    real_objective, calls = getattr(module, name), {'n': 0}
    def poisoned(*a, **k):
        calls['n'] += 1
        out = real_objective(*a, **k)
        return out * float('nan') if calls['n'] == 2 else out
    monkeypatch.setattr(module, name, poisoned)
    seen = []
    hp = {**smoke_hp(method, 'tiny', iterations=3, init='noise'), **TINY_NET}
    hp.pop('net'); opts = hp.pop('net_options')
    distill, cfg = (dm.distill_dm, dm.DMConfig(**hp)) if method == 'dm' else (gm.distill_gm, gm.GMConfig(**hp))
    out = distill(tiny(), 2, cfg, run=RunFolder(tmp_path), net_options=opts, progress=False,
                  on_iteration=lambda it, im: seen.append(im.detach().clone()))
    assert torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])      # iteration 2 skipped, 3 went on
    assert torch.isfinite(out.images).all() and out.provenance['skipped'] == 1
    assert [r['skipped'] for r in RunFolder(tmp_path).metrics()] == [0, 1, 1]


def test_bad_hyper_parameters_are_named():
    with pytest.raises(ValueError, match=r"dc/dsa: unknown hyper-parameter\(s\) \['lr_imgs'\]"):
        get_method('dc').fn(tiny(), 2, {**TINY_NET, 'lr_imgs': 1.0}, None, 0, 'cpu', None, False)
    with pytest.raises(ValueError, match=r"GMConfig.distance='l2'"):
        gm.GMConfig(distance='l2')
    with pytest.raises(ValueError, match=r"DMConfig.init='zeros'"):
        get_method('dm').fn(tiny(), 2, {**TINY_NET, 'init': 'zeros'}, None, 0, 'cpu', None, False)


@pytest.mark.parametrize('method', METHODS)
def test_run_end_to_end(dataset, data_dir, tmp_path, method):
    ds = dataset('breastmnist')
    res = run(RunSpec(method, 'breastmnist', 2, 'smoke', device='cpu'), root=tmp_path, data_root=data_dir,
              progress=False)
    check_synset(res.synset, ds, 2)
    assert len(res.eval['accs']) == 2 and res.eval['lr'] == 0.01
    logged = res.folder.metrics()
    objective = 'embed_distance' if method == 'dm' else 'grad_distance'
    assert [r['iteration'] for r in logged] == list(range(1, res.folder.config['hp']['iterations'] + 1))
    assert all(math.isfinite(r[objective]) and r['wall_s'] > 0 for r in logged)
