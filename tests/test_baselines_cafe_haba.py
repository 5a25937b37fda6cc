"""CAFE and HaBa on real data: each lowers its own objective on 2D and 3D sets, returns the right shapes and labels,
is reproducible from the seed, copes with 3 channels and 9 classes; CAFE resumes exactly after a kill; HaBa stays
within its budget and refuses an ipc it cannot fit; both run end to end through `ptm_nb.runs.run`.
AdrenalMNIST3D is cut to its first 40 training and test volumes per class, so that its experts train in seconds."""
import dataclasses
from types import SimpleNamespace
import pytest
import torch
from ptm_nb.data import load_dataset
from ptm_nb.distill import RunFolder, get_method
from ptm_nb.experts import ExpertConfig, generate_experts
from ptm_nb.nets import make_net, functional
from ptm_nb.unroll import UnrollConfig, unroll_student, matching_loss, plan_unroll
from ptm_nb.baselines.common import ClassBatches, baseline_net
from ptm_nb.baselines.cafe import CAFEConfig, cafe_init, cafe_loss
from ptm_nb.baselines.haba import HaBaConfig, haba_init, decode, decode_factors, plan_budget

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

NET = {'width': 8, 'depth': 2}
CAFE_HP = {'iterations': 3, 'batch_real': 16, 'batch_watch': 16, 'window': 2, 'max_outer': 3, 'max_inner': 2,
           'lr_img': 0.5, 'net': 'convnet', 'net_options': NET}
HABA_HP = {'iterations': 4, 'syn_steps': 3, 'max_start_epoch': 1, 'expert_epochs': 1, 'batch_syn': 6,
           'lr_lr': 1e-6, 'checkpoint_every': 2, 'net': 'convnet', 'net_options': NET}


@pytest.fixture(scope='module')
def datasets(data_dir):
    cache = {}
    def get(name):
        if name not in cache:
            if name == 'pathmnist_subset1000' and not (data_dir / '..' / 'custom' / 'pathmnist_subset1000.npz').exists():
                pytest.skip(f'real data file absent: {data_dir / ".." / "custom" / "pathmnist_subset1000.npz"}')
            ds = load_dataset(name, root=data_dir, download=False)
            cache[name] = small(ds) if name == 'adrenalmnist3d' else ds
        return cache[name]
    return get


@pytest.fixture(scope='module')
def experts(datasets, tmp_path_factory):
    "A tiny expert buffer per dataset (2 experts x 1 epoch of the test's ConvNet), made once."
    cache, root = {}, tmp_path_factory.mktemp('experts')
    def get(name):
        if name not in cache:
            cache[name] = generate_experts(datasets(name), ExpertConfig(net_options=NET, n_experts=2, epochs=1, batch=256,
                                                                        lr=0.01, dsa=False), root, progress=False)
        return cache[name]
    return get


def small(ds, per_class=40):
    "The dataset cut to its first `per_class` training and test images of each class (3D experts train in seconds)."
    def cut(x, y):
        keep = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(ds.n_classes)])
        return x[keep], y[keep]
    (trx, try_), (tex, tey) = cut(ds.train_x, ds.train_y), cut(ds.test_x, ds.test_y)
    return dataclasses.replace(ds, name=ds.name + '_small', train_x=trx, train_y=try_, val_x=tex, val_y=tey,
                               test_x=tex, test_y=tey)


def fixed_batch(ds, n, seed=7):
    "A class-major real batch of n training images per class, the same every time."
    g, cb = torch.Generator().manual_seed(seed), ClassBatches(ds.train_x, ds.train_y, ds.n_classes)
    return torch.cat([cb.batch(c, n, g) for c in range(ds.n_classes)])


# ---------------------------------------------------------------------------------------------------------- CAFE

@pytest.mark.parametrize('name', ['breastmnist', 'adrenalmnist3d'])
def test_cafe_lowers_its_objective_and_is_reproducible(datasets, name):
    ds, fn = datasets(name), get_method('cafe').fn
    a = fn(ds, 2, CAFE_HP, None, 0, 'cpu', None, False)
    b = fn(ds, 2, CAFE_HP, None, 0, 'cpu', None, False)
    assert a.images.shape == (4, *ds.image_shape) and a.images.dtype == torch.float32
    assert a.labels.tolist() == [0, 0, 1, 1] and a.lr > 0 and not a.soft
    assert torch.equal(a.images, b.images)                                   # same seed, same set
    # the objective on a network and a real batch the run never used, without augmentation
    cfg = CAFEConfig.from_hp({**{k: v for k, v in CAFE_HP.items() if k not in ('net', 'net_options')}, 'dsa': 'none'})
    start, _ = cafe_init(ds, 2, cfg, torch.Generator().manual_seed(0))
    net, real = baseline_net(ds, CAFE_HP, torch.Generator().manual_seed(123)), fixed_batch(ds, 16)
    with torch.no_grad():
        before, after = (float(cafe_loss(net, real, x, ds.n_classes, cfg)['loss']) for x in (start, a.images))
    assert after < 0.9 * before, (before, after)


def test_cafe_three_channels_nine_classes(datasets):
    ds = datasets('pathmnist_subset1000')
    s = get_method('cafe').fn(ds, 2, {**CAFE_HP, 'iterations': 1, 'max_outer': 2}, None, 0, 'cpu', None, False)
    assert ds.n_classes == 9 and s.images.shape == (18, 3, 28, 28)
    assert s.labels.tolist() == [c for c in range(9) for _ in range(2)] and torch.isfinite(s.images).all()


class KilledAt(RunFolder):
    "A run folder whose process dies while logging iteration `kill_at` (its checkpoint holds the one before)."
    kill_at = None
    def log(self, record):
        if record['iteration'] == self.kill_at: raise KeyboardInterrupt
        super().log(record)


def test_cafe_resumes_exactly(datasets, tmp_path):
    ds, fn = datasets('breastmnist'), get_method('cafe').fn
    hp = {**CAFE_HP, 'checkpoint_every': 1}
    whole = fn(ds, 2, hp, None, 0, 'cpu', RunFolder(tmp_path / 'whole'), False)
    killed = KilledAt(tmp_path / 'killed'); killed.kill_at = 3
    with pytest.raises(KeyboardInterrupt): fn(ds, 2, hp, None, 0, 'cpu', killed, False)
    assert killed.load_checkpoint()['state']['iteration'] == 2
    resumed = fn(ds, 2, hp, None, 0, 'cpu', RunFolder(tmp_path / 'killed'), False)
    assert torch.equal(resumed.images, whole.images)
    assert [r['iteration'] for r in RunFolder(tmp_path / 'killed').metrics()] == [1, 2, 3]
    m = RunFolder(tmp_path / 'whole').metrics()
    assert all({'iteration', 'cafe_loss', 'wall_s'} <= set(r) for r in m)


def test_cafe_bad_knobs_are_named():
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['lamda_1'\]"):
        CAFEConfig.from_hp({'lamda_1': 0.1})
    with pytest.raises(ValueError, match='layer_weights has 2 entries but the network has 3 feature taps'):
        ds = SimpleNamespace(train_x=torch.randn(8, 1, 8, 8), train_y=torch.arange(8) % 2, n_classes=2,
                             image_shape=(1, 8, 8), name='tiny')
        get_method('cafe').fn(ds, 1, {**CAFE_HP, 'layer_weights': [1, 1], 'batch_real': 2, 'batch_watch': 2}, None, 0,
                              'cpu', None, False)


# ---------------------------------------------------------------------------------------------------------- HaBa

def mean_match(ds, buf, images, labels, lr):
    "Matching loss over every (expert, start) segment the test's runs draw from, each with one fixed student plan."
    f, ucfg, out = functional(make_net('convnet', ds.image_shape, ds.n_classes, **NET)), UnrollConfig(syn_steps=3, dsa=None), []
    for k in range(2):
        th0, th1 = buf.snapshot(k, 0), buf.snapshot(k, 1)
        plan = plan_unroll(len(images), ucfg, torch.Generator().manual_seed(k), images.dim() - 2)
        with torch.no_grad():
            out.append(float(matching_loss(unroll_student(f, th0, images, labels, lr, ucfg, plan=plan), th0, th1)))
    return sum(out) / len(out)


def stored_floats(factors) -> int:
    "Every float the factors hold (the bases and every hallucinator parameter), counted from the tensors."
    return sum(stored_floats(v) if isinstance(v, dict) else v.numel() for v in factors.values())


@pytest.mark.parametrize('name', ['breastmnist', 'adrenalmnist3d'])
def test_haba_lowers_its_objective_within_budget_and_is_reproducible(datasets, experts, name):
    ds, buf, fn = datasets(name), experts(name), get_method('haba').fn
    a = fn(ds, 2, HABA_HP, buf, 0, 'cpu', None, False)
    b = fn(ds, 2, HABA_HP, buf, 0, 'cpu', None, False)
    p = a.provenance['haba']
    assert a.images.shape == (2 * p['views_per_class'], *ds.image_shape) and p['views_per_class'] == 5 * p['bases_per_class']
    assert a.labels.tolist() == [c for c in range(2) for _ in range(p['views_per_class'])] and a.lr >= 1e-3
    assert torch.equal(a.images, b.images) and a.lr == b.lr                   # same seed, same set
    assert torch.allclose(decode_factors(a), a.images)                        # the images are the decoded factors
    # the budget, counted from what is stored
    budget = ds.n_classes * 2 * ds.train_x[0].numel()
    assert stored_floats(a.factors) == p['stored_floats'] <= budget == p['budget_floats']
    assert 'n_classes*ipc*numel' in p['budget_note']
    # the matching loss on fixed segments and plans is lower for the distilled factors than for the starting ones
    plan = plan_budget(ds.n_classes, 2, ds.image_shape)
    bases, hallucinators = haba_init(ds, plan, HaBaConfig.from_hp(HABA_HP), torch.Generator().manual_seed(0))
    with torch.no_grad(): start = decode(bases, hallucinators)
    before, after = mean_match(ds, buf, start, a.labels, buf.config['lr']), mean_match(ds, buf, a.images, a.labels, a.lr)
    assert after < 0.95 * before, (before, after)


def test_haba_three_channels_nine_classes(datasets, experts):
    ds = datasets('pathmnist_subset1000')
    s = get_method('haba').fn(ds, 2, {**HABA_HP, 'iterations': 1}, experts('pathmnist_subset1000'), 0, 'cpu', None, False)
    p = s.provenance['haba']
    assert ds.n_classes == 9 and s.images.shape == (9 * p['views_per_class'], 3, 28, 28)
    assert s.labels.tolist() == [c for c in range(9) for _ in range(p['views_per_class'])]
    assert stored_floats(s.factors) <= 9 * 2 * 3 * 28 * 28


def test_haba_over_budget_is_a_clear_error(datasets, experts):
    ds = datasets('breastmnist')
    with pytest.raises(ValueError, match=r'haba: ipc=1 for 2 classes of shape \(1, 28, 28\).*use ipc >= 2'):
        get_method('haba').fn(ds, 1, HABA_HP, experts('breastmnist'), 0, 'cpu', None, False)
    with pytest.raises(ValueError, match=r'use ipc >= \d+'):
        plan_budget(9, 1, (3, 28, 28))


# ---------------------------------------------------------------------------------------------------------- NaN

@pytest.mark.parametrize('method', ['cafe', 'haba'])
def test_a_nan_never_reaches_the_images(datasets, experts, tmp_path, monkeypatch, method):
    import ptm_nb.baselines.cafe as cafe_module, ptm_nb.baselines.haba as haba_module
    module, name = (cafe_module, 'cafe_loss') if method == 'cafe' else (haba_module, 'matching_loss')
    real, calls = getattr(module, name), {'n': 0}
    def poisoned(*a, **k):
        calls['n'] += 1
        out = real(*a, **k)
        if calls['n'] != 2: return out
        return {**out, 'loss': out['loss'] * float('nan')} if isinstance(out, dict) else out * float('nan')
    monkeypatch.setattr(module, name, poisoned)
    ds = datasets('breastmnist')
    hp, buf = (CAFE_HP, None) if method == 'cafe' else (HABA_HP, experts('breastmnist'))
    s = get_method(method).fn(ds, 2, hp, buf, 0, 'cpu', RunFolder(tmp_path), False)
    assert torch.isfinite(s.images).all() and s.provenance['skipped'] == 1
    assert RunFolder(tmp_path).metrics()[-1]['skipped'] == 1


# ---------------------------------------------------------------------------------------------------------- runs

@pytest.mark.parametrize('method', ['cafe', 'haba'])
def test_run_end_to_end(data_dir, tmp_path, method):
    import ptm_nb.baselines.cafe, ptm_nb.baselines.haba      # noqa: F401 (registers the methods)
    from ptm_nb.runs import RunSpec, run
    r = run(RunSpec(method, 'breastmnist', 2, 'smoke', device='cpu'), root=tmp_path, data_root=data_dir, progress=False)
    assert r.synset.provenance['method'] == method and len(r.eval['accs']) == 2 and 0 <= r.eval['acc_mean'] <= 1
    assert r.synset.lr > 0 and r.eval['lr'] == (r.synset.lr if method == 'haba' else 0.01)
    m = r.folder.metrics()
    assert m and all({'iteration', 'wall_s'} <= set(x) for x in m) and m[-1]['iteration'] == r.synset.provenance['iterations']
    assert {'cafe': 'cafe_loss', 'haba': 'haba_loss'}[method] in m[-1]
