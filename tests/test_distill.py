"""The distillation engine across modules: the NaN guard inside the loop, the method presets on one engine,
reproducibility from the seed, and the registry's errors."""
from types import SimpleNamespace
import pytest
import torch
import ptm_nb.distill as distill
from ptm_nb.distill import TMConfig, RunFolder, distill_tm, get_method, METHODS
from ptm_nb.ptm import PTMHooks
from ptm_nb.baselines.ftd import EMAHooks
from ptm_nb.experts import ExpertConfig, generate_experts


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    def blobs(n):
        y = torch.arange(n) % 3
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
        for c in range(3): x[y == c, :, 2:6, 2 * c:2 * c + 3] += 1.5
        return x, y
    (trx, tr_y), (tex, tey) = blobs(60), blobs(30)
    ds = SimpleNamespace(name='blobs3', train_x=trx, train_y=tr_y, val_x=tex, val_y=tey, test_x=tex, test_y=tey,
                         n_classes=3, image_shape=(1, 8, 8), channels=1, is_3d=False)
    net = {'width': 8, 'depth': 2}
    root = tmp_path_factory.mktemp('experts')
    plain = generate_experts(ds, ExpertConfig(net_options=net, n_experts=2, epochs=3, batch=30, lr=0.05), root, progress=False)
    return ds, plain, net


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

CFG = dict(iterations=5, syn_steps=3, max_start_epoch=2, expert_epochs=1, lr_img=10, lr_lr=1e-5)


def test_nan_never_reaches_the_images(tiny, tmp_path, monkeypatch):
    ds, experts, net = tiny
    real_loss, calls = distill.matching_loss, {'n': 0}
    def poisoned(*a, **k):
        calls['n'] += 1
        out = real_loss(*a, **k)
        return out * float('nan') if calls['n'] == 3 else out
    monkeypatch.setattr(distill, 'matching_loss', poisoned)
    seen = []
    synset = distill_tm(ds, experts, TMConfig(schedule='progressive', **CFG), ipc=2, seed=0, run=RunFolder(tmp_path),
                        net_options=net, progress=False, on_iteration=lambda it, im, lr: seen.append(im.detach().clone()),
                        hooks=[PTMHooks(max_target_epoch=2)])
    assert torch.equal(seen[2], seen[1])                           # iteration 3's update was skipped ...
    assert not torch.equal(seen[3], seen[2])                       # ... and the run went on
    assert all(torch.isfinite(s).all() for s in seen) and torch.isfinite(synset.images).all()
    m = RunFolder(tmp_path).metrics()
    assert [r['skipped'] for r in m] == [0, 0, 1, 1, 1] and m[2]['updated'] is False
    assert synset.provenance['skipped'] == 1


@pytest.mark.parametrize('method', ['mtt', 'mtt_backend', 'smdd', 'ptm'])
def test_presets_reproducible_and_moving(tiny, method):
    ds, experts, net = tiny
    hp = {**CFG, **{'mtt': {}, 'mtt_backend': {'schedule': 'backend', 'backend_p': 1.0}, 'smdd': {'prune_fraction': 0.1},
                    'ptm': {'schedule': 'progressive', 'steps': 'proportional', 'beta_overlap': 0.005, 'retrain_k': 1,
                            'max_target_epoch': 2}}[method],
          'net_options': net}
    fn = get_method(method).fn
    a = fn(ds, 2, hp, experts, 3, 'cpu', None, False)
    b = fn(ds, 2, hp, experts, 3, 'cpu', None, False)
    c = fn(ds, 2, hp, experts, 4, 'cpu', None, False)
    assert a.images.shape == (6, 1, 8, 8) and a.labels.tolist() == [0, 0, 1, 1, 2, 2] and a.lr > 0
    assert torch.equal(a.images, b.images) and a.lr == b.lr        # same seed, same set
    assert not torch.equal(a.images, c.images)                     # another seed, another set


def test_ema_is_what_ftd_returns(tiny):
    ds, experts, net = tiny
    seen = []
    out = distill_tm(ds, experts, TMConfig(**CFG), ipc=2, seed=0, net_options=net, progress=False,
                     on_iteration=lambda it, im, lr: seen.append(im.detach().clone()), hooks=[EMAHooks(ema_decay=0.5)])
    init, _ = distill.initial_images(ds.train_x, ds.train_y, 3, 2, 'real', torch.Generator().manual_seed(0))
    ema = init.clone()
    for s in seen: ema = 0.5 * ema + 0.5 * s
    assert torch.allclose(out.images, ema, atol=1e-6) and not torch.equal(out.images, seen[-1])


def test_experts_too_short_is_a_clear_error(tiny):
    ds, experts, net = tiny
    with pytest.raises(ValueError, match='epochs'):
        distill_tm(ds, experts, TMConfig(**{**CFG, 'max_start_epoch': 5}), ipc=2, net_options=net, progress=False)


def test_a_knob_of_another_method_is_refused_before_any_work(tiny):
    ds, experts, net = tiny
    with pytest.raises(ValueError, match="mtt: unknown hyper-parameter.*'beta_overlap'"):
        get_method('mtt').fn(ds, 2, {**CFG, 'beta_overlap': 0.1}, experts, 0, 'cpu', None, False)
    with pytest.raises(ValueError, match="schedule='progressive'"):          # PTM's window without PTM's hooks
        distill_tm(ds, experts, TMConfig(schedule='progressive', **CFG), ipc=2, net_options=net, progress=False)


def test_registry_lists_every_method():
    assert {'ptm', 'mtt', 'ftd', 'smdd', 'mtt_backend', 'random'} <= set(METHODS)
    with pytest.raises(ValueError, match='known methods'):
        get_method('nope')
