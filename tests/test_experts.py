"""Expert trajectories: training (SGD, momentum/weight decay, GSAM) against direct computations, storage, resume
after a crash, damaged files, and the errors a method sees when a buffer is too small."""
import dataclasses, os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptm_nb.data import MedDataset
from ptm_nb.io import CorruptFileWarning
from ptm_nb.nets import make_net, functional, flat_params
from ptm_nb.train import auc_ovr
from ptm_nb.experts import (ExpertConfig, ExpertError, ExpertBuffer, train_expert, train_experts_stacked,
                            generate_experts, gsam_direction, loss_and_grad, init_flat, expert_generators, expert_folder,
                            expert_path, read_expert)

TINY = dict(net_options=dict(width=4, depth=1), epochs=2, batch=32, lr=0.05, seed=0)


def generated(n_train=64, n_test=32, seed=0, name='generated'):
    "A small learnable 2-class set in MedDataset form: a bright or a dark square in noise."
    g = torch.Generator().manual_seed(seed)
    def split(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
        x[:, :, 4:12, 4:12] += (2 * y.float() - 1).view(-1, 1, 1, 1)
        return x, y
    (a, b), (c, d), (e, f) = split(n_train), split(16), split(n_test)
    return MedDataset(name=name, train_x=a, train_y=b, val_x=c, val_y=d, test_x=e, test_y=f, mean=torch.zeros(1), std=torch.ones(1),
                      class_names=['dark', 'bright'], n_classes=2, channels=1, image_shape=(1, 16, 16), is_3d=False,
                      modality='generated', source='generated')


def _files(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in Path(folder).glob('expert_*.pt')}


def test_trajectory_shape_init_and_seed():
    ds, cfg = generated(), ExpertConfig(**TINY)
    traj, meta = train_expert(ds, cfg, 0)
    net = make_net(cfg.net, ds.image_shape, ds.n_classes, generator=expert_generators(cfg, 0)['init'], **cfg.net_options)
    assert traj.shape == (cfg.epochs + 1, flat_params(net).numel()) and traj.dtype == torch.float32
    assert torch.equal(traj[0], flat_params(net))                       # row 0 = θ_0 drawn from the seed
    assert torch.equal(traj, train_expert(ds, cfg, 0)[0])               # reproducible
    assert not torch.equal(traj, train_expert(ds, dataclasses.replace(cfg, seed=1), 0)[0])
    assert not torch.equal(traj[1], traj[0]) and not torch.equal(traj[2], traj[1])   # it trains every epoch
    assert meta['index'] == 0 and meta['dataset'] == 'generated' and meta['lr'] == cfg.lr
    assert len(meta['test_acc']) == cfg.epochs + 1 and meta['wall_s'] > 0


def test_plain_sgd_with_momentum_and_weight_decay_matches_torch_optim():
    "train_expert's update on the flat vector equals torch.optim.SGD on the module, batch for batch."
    ds = generated(n_train=40)
    cfg = ExpertConfig(**{**TINY, 'epochs': 1, 'batch': 16}, dsa=False, momentum=0.9, weight_decay=5e-4)
    traj, _ = train_expert(ds, cfg, 3)
    gens = expert_generators(cfg, 3)
    net = make_net(cfg.net, ds.image_shape, ds.n_classes, generator=gens['init'], **cfg.net_options)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(ds.train_y), generator=gens['train'])
    for i in range(0, len(order), cfg.batch):            # 16, 16, 8: the last batch is the remainder
        idx = order[i:i + cfg.batch]
        opt.zero_grad(); F.cross_entropy(net(ds.train_x[idx]), ds.train_y[idx]).backward(); opt.step()
    assert torch.allclose(traj[1], flat_params(net), atol=1e-6)


def test_gsam_direction_matches_direct_computation_on_a_net():
    "GSAM on the flat vector vs the same formula on the module's parameters, perturbed in place."
    ds, cfg = generated(), ExpertConfig(**TINY)
    net, w = init_flat(ds, cfg, 0)
    x, y, rho, alpha = ds.train_x[:20], ds.train_y[:20], 0.05, 0.3
    loss, d = gsam_direction(lambda v: loss_and_grad(functional(net), v, x, y), w, rho, alpha)

    params = list(net.parameters())
    def grads():
        net.zero_grad(); F.cross_entropy(net(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])
    g = grads()
    with torch.no_grad():
        for p, e in zip(params, torch.split(rho * g / g.norm(), [p.numel() for p in params])): p += e.view_as(p)
    g_p = grads()
    cos = (g @ g_p) / (g.norm() * g_p.norm())
    g_perp = g - cos * g.norm() * g_p / g_p.norm()     # GSAM's paper form of the orthogonal part
    assert torch.allclose(d, g_p - alpha * g_perp, atol=1e-6)
    assert abs(float(g_perp @ g_p)) < 1e-5 * float(g.norm() * g_p.norm())
    assert not torch.allclose(d, g)                    # GSAM really differs from SGD here


def test_flat_expert_step_is_the_gsam_update():
    "One full-batch GSAM step of train_expert equals θ_0 − lr·d with d computed directly."
    ds = generated(n_train=24)
    cfg = ExpertConfig(**{**TINY, 'epochs': 1, 'batch': 64}, dsa=False, flat=True, rho=0.05, alpha=0.3)
    traj, meta = train_expert(ds, cfg, 0)
    net, w0 = init_flat(ds, cfg, 0)
    order = torch.randperm(24, generator=expert_generators(cfg, 0)['train'])
    f = functional(net)
    _, d = gsam_direction(lambda v: loss_and_grad(f, v, ds.train_x[order], ds.train_y[order]), w0, 0.05, 0.3)
    assert torch.allclose(traj[1], w0 - cfg.lr * d, atol=1e-6)
    plain = train_expert(ds, dataclasses.replace(cfg, flat=False), 0)[0]
    assert not torch.allclose(traj[1], plain[1], atol=1e-6)
    assert meta['flat'] is True


def test_stacked_experts_equal_one_at_a_time(tmp_path):
    "Plain experts trained together (ptm_nb.train.fit_stack) are the one-at-a-time experts, to float rounding."
    ds, cfg = generated(), ExpertConfig(**TINY, n_experts=3, parallel=2)
    stacked, one = train_experts_stacked(ds, cfg, [2, 0]), {}
    for k, (traj, meta) in zip([2, 0], stacked):
        one[k], one_meta = train_expert(ds, cfg, k)
        assert meta['index'] == k and meta['trained'].startswith('stacked')
        assert torch.allclose(traj, one[k], atol=1e-5), (traj - one[k]).abs().max()
        assert meta['train_loss'] == pytest.approx(one_meta['train_loss'], rel=1e-4)
    buf = generate_experts(ds, cfg, tmp_path, progress=False)            # groups of 2: experts (0, 1), then 2
    assert [buf.meta['experts'][str(k)]['trained'][:7] for k in range(3)] == ['stacked', 'stacked', 'one']
    assert torch.equal(buf.trajectory(2), one[2]) and torch.allclose(buf.trajectory(0), one[0], atol=1e-5)
    with pytest.raises(ExpertError, match='cannot be trained stacked'):
        train_experts_stacked(ds, dataclasses.replace(cfg, flat=True), [0])


def test_generate_kill_and_resume(tmp_path):
    ds, cfg = generated(), ExpertConfig(**TINY, n_experts=3)

    def crash_after_expert_1(k, folder):
        if k == 1: raise KeyboardInterrupt('simulated kill after expert 1')
    with pytest.raises(KeyboardInterrupt):
        generate_experts(ds, cfg, tmp_path / 'run', on_expert_done=crash_after_expert_1, progress=False)
    folder = expert_folder(ds, cfg, tmp_path / 'run')
    before = _files(folder)
    assert sorted(before) == ['expert_000.pt', 'expert_001.pt']
    assert len(ExpertBuffer(folder)) == 2
    # a process killed while writing expert 2 leaves a temporary file and maybe a torn final file
    (folder / '.expert_002.pt.abc.tmp').write_bytes(b'half')
    expert_path(folder, 2).write_bytes(expert_path(folder, 0).read_bytes()[:1000])

    done = []
    with pytest.warns(CorruptFileWarning, match=r'expert_002\.pt: .*moved aside to expert_002\.pt\.corrupt'):
        buf = generate_experts(ds, cfg, tmp_path / 'run', on_expert_done=lambda k, f: done.append(k),
                               progress=False)
    assert done == [2]                                              # only the unfinished expert was trained
    after = _files(folder)
    assert {k: after[k] for k in before} == before                  # experts 0 and 1 were not rewritten
    assert not list(folder.glob('*.tmp'))
    clean = generate_experts(ds, cfg, tmp_path / 'clean', progress=False)
    assert len(buf) == len(clean) == 3
    for k in range(3): assert torch.equal(buf.trajectory(k), clean.trajectory(k))
    assert buf.meta['experts']['2']['test_acc'] == clean.meta['experts']['2']['test_acc']


def test_more_experts_extend_the_same_folder(tmp_path):
    ds = generated()
    small = generate_experts(ds, ExpertConfig(**TINY, n_experts=1), tmp_path, progress=False)
    mtime = _files(small.folder)
    big = generate_experts(ds, ExpertConfig(**TINY, n_experts=2), tmp_path, progress=False)
    assert big.folder == small.folder and len(big) == 2 and _files(big.folder)['expert_000.pt'] == mtime['expert_000.pt']


def test_damaged_file_is_detected_and_redone(tmp_path):
    ds, cfg = generated(), ExpertConfig(**TINY, n_experts=2)
    buf = generate_experts(ds, cfg, tmp_path, progress=False)
    good = buf.trajectory(1).clone()
    path = expert_path(buf.folder, 1)
    raw = bytearray(path.read_bytes()); raw[-200] ^= 0xFF; path.write_bytes(bytes(raw))   # same size, one bit flipped
    done = []
    with pytest.warns(CorruptFileWarning, match=r'expert_001\.pt: its sha256 is .* recorded in meta\.json'):
        buf = generate_experts(ds, cfg, tmp_path, on_expert_done=lambda k, f: done.append(k),
                               progress=False)
    assert done == [1] and torch.equal(buf.trajectory(1), good)
    path.write_bytes(b'not a torch file')                            # unreadable: a clear error when read
    with pytest.raises(ExpertError, match='expert_001.pt cannot be read'):
        ExpertBuffer(buf.folder).trajectory(1)


def test_a_record_without_its_experts_trains_them_again(tmp_path):
    # a clone holds the committed meta.json of a buffer and none of its expert files
    ds, cfg = generated(), ExpertConfig(**TINY, n_experts=2)
    buf = generate_experts(ds, cfg, tmp_path, progress=False)
    want = [buf.trajectory(k).clone() for k in range(2)]
    for k in range(2): expert_path(buf.folder, k).unlink()
    done = []
    again = generate_experts(ds, cfg, tmp_path, on_expert_done=lambda k, f: done.append(k), progress=False)
    assert done == [0, 1] and all(torch.equal(again.trajectory(k), want[k]) for k in range(2))


def test_buffer_access_and_errors(tmp_path):
    ds, cfg = generated(), ExpertConfig(**TINY, n_experts=2)
    buf = generate_experts(ds, cfg, tmp_path, progress=False)
    traj, _ = read_expert(buf.folder, 1)
    assert torch.equal(buf.snapshot(1, 2), traj[2]) and buf.snapshot(1, 2).shape == (buf.n_params,)
    assert buf.test_accuracy().shape == (2, 3) and buf.epochs == 2 and len(buf) == 2
    with pytest.raises(ExpertError, match=r'MTT needs 5 experts \(it has 2\) and 10 epochs per expert \(it has 2\)') as e:
        buf.require(n_experts=5, epochs=10, method='MTT')
    assert str(buf.folder) in str(e.value) and 'n_experts=5' in str(e.value) and 'epochs=10' in str(e.value)
    assert buf.require(n_experts=2, epochs=2) is buf
    with pytest.raises(ExpertError, match='expert 2 is not in'): buf.trajectory(2)
    with pytest.raises(ExpertError, match='epoch 3 is out of range'): buf.snapshot(0, 3)
    with pytest.raises(ExpertError, match='no expert buffer at'): ExpertBuffer(tmp_path / 'nothing')


def test_folder_identity(tmp_path):
    ds, cfg = generated(), ExpertConfig(**TINY)
    f = expert_folder(ds, cfg, tmp_path)
    assert f.parent == tmp_path and f.name.startswith('generated-convnet-')
    assert expert_folder(ds, dataclasses.replace(cfg, n_experts=9, device='cuda'), tmp_path) == f
    assert expert_folder(ds, dataclasses.replace(cfg, lr=0.02), tmp_path) != f
    assert expert_folder(ds, dataclasses.replace(cfg, flat=True), tmp_path) != f
    assert expert_folder(generated(seed=1), cfg, tmp_path) != f        # same name and counts, other pixels
    buf = generate_experts(ds, dataclasses.replace(cfg, epochs=1, n_experts=1), tmp_path, progress=False)
    again = buf.expert_config(n_experts=4)                               # the config back from meta.json
    assert expert_folder(ds, again, tmp_path) == buf.folder and again.n_experts == 4 and again.lr == cfg.lr


def test_multilabel_dataset_is_refused():
    ds = generated()
    ds = dataclasses.replace(ds, train_y=torch.zeros(len(ds.train_y), 3))
    with pytest.raises(ExpertError, match='multi-label'): train_expert(ds, ExpertConfig(**TINY), 0)


@pytest.mark.parametrize('field,value', [('epochs', 0), ('n_experts', 0), ('batch', 0), ('momentum', 1.0), ('rho', -0.1)])
def test_bad_config(field, value):
    with pytest.raises(ExpertError, match=f'ExpertConfig.{field} = '): ExpertConfig(**{field: value})


def test_learns_breastmnist(need_file):
    """A small ConvNet expert on the real BreastMNIST: the loss falls, and the final weights rank the test images
    well above chance (AUC; the plain accuracy of always answering the majority class is already 73 % there,
    and four short epochs with DSA do not always move the decision threshold off it)."""
    from ptm_nb.data import load_dataset
    path = need_file('breastmnist.npz')
    ds = load_dataset('breastmnist', root=path.parent, download=False)
    cfg = ExpertConfig(net_options=dict(width=8, depth=1), epochs=4, batch=64, seed=0)
    traj, meta = train_expert(ds, cfg, 0)
    assert traj.shape[0] == 5 and torch.isfinite(traj).all()
    assert meta['train_loss'][-1] < meta['train_loss'][0], meta['train_loss']
    net = init_flat(ds, cfg, 0)[0]
    with torch.no_grad(): logits = functional(net)(traj[-1], ds.test_x)
    assert auc_ovr(logits, ds.test_y) > 0.7, (meta['test_acc'], auc_ovr(logits, ds.test_y))   # 0.81 measured
