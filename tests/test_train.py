"""ptm_nb.train: reproducibility, batched == one by one, real training, soft labels, metrics, bad input."""
import dataclasses
import math
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import ptm_nb.train as T
from ptm_nb.augment import DSAConfig
from ptm_nb.data import load_dataset
from ptm_nb.nets import flat_params, make_net
from ptm_nb.engines import CPU_STACK_MAX_BATCH, pick_engine
from ptm_nb.train import (EvalProtocol, EvalResult, TrainConfig, auc_ovr, balanced_accuracy, evaluate_synset,
                          fit_stack, full_data_baseline, majority_class_accuracy, random_real_baseline, train_net)

TINY = {'width': 4, 'depth': 2}


def toy(n=12, classes=3, shape=(1, 12, 12), seed=0):
    "Class-dependent random images: a learnable problem without real data."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, *shape, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


@pytest.fixture(scope='module')
def toy_sets():
    x, y = toy(12)
    tx, ty = toy(30, seed=1)
    return x, y, tx, ty


@pytest.fixture(scope='module')
def breast(data_dir):
    if not (data_dir / 'breastmnist.npz').exists(): pytest.skip(f'real data file absent: {data_dir / "breastmnist.npz"}')
    return load_dataset('breastmnist', root=data_dir, download=False)


# ---- reproducibility and batched == sequential -------------------------------------------------------------

def test_same_seed_same_result(toy_sets):
    x, y, tx, ty = toy_sets
    run = lambda seed: evaluate_synset(x, y, tx, ty, EvalProtocol(net_options=TINY, epochs=3, K=2, seed=seed),
                                       keep_params=True)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.params, b.params) and a.accs == b.accs and a.aucs == b.aucs
    assert not torch.allclose(a.params, c.params)                       # another seed: other nets
    assert not torch.allclose(a.params[0], a.params[1])                 # each net its own init
    assert T.results_of(a.to_dict()) == T.results_of(b.to_dict()) and a.to_dict()['device'] == 'cpu'    # the record says where it trained
    assert a.to_dict()['seconds'] == round(a.seconds, 1) and a.seconds > 0   # and in how long


@pytest.mark.parametrize('engine', ['stacked', 'vmap'])
def test_batched_equals_one_by_one(toy_sets, engine):
    x, y, tx, ty = toy_sets
    p = EvalProtocol(net_options=TINY, epochs=2, K=3, seed=3, batch_size=5)   # 3 batches, the last partial
    seq = evaluate_synset(x, y, tx, ty, dataclasses.replace(p, batched=False), keep_params=True)
    bat = evaluate_synset(x, y, tx, ty, dataclasses.replace(p, batched=True, engine=engine), keep_params=True)
    assert seq.engine.startswith('func') and bat.engine == engine
    assert (bat.params - seq.params).abs().max() < 1e-4
    assert bat.accs == seq.accs
    assert torch.allclose(torch.tensor(bat.train_loss), torch.tensor(seq.train_loss), atol=1e-5)


def test_batched_equals_one_by_one_per_net_sets_and_soft_labels():
    xs = torch.stack([toy(6, 2, seed=s)[0] for s in range(3)])          # one set per net, (K, N, ...)
    soft = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(0))  # logits as labels
    tx, ty = toy(10, 2, seed=9)
    p = EvalProtocol(net_options=TINY, epochs=3, K=3)
    seq = evaluate_synset(xs, soft, tx, ty, dataclasses.replace(p, batched=False), keep_params=True)
    bat = evaluate_synset(xs, soft, tx, ty, dataclasses.replace(p, batched=True), keep_params=True)
    assert (bat.params - seq.params).abs().max() < 1e-4 and bat.accs == seq.accs


def test_train_net_is_net_k_of_evaluate_synset(toy_sets):
    x, y, tx, ty = toy_sets
    res = evaluate_synset(x, y, tx, ty, EvalProtocol(net_options=TINY, epochs=3, K=2, seed=4), keep_params=True)
    net = make_net('convnet', (1, 12, 12), 3, T.stream_generator(4, 'net', 1, 'init'), **TINY)
    one = train_net(net, x, y, tx, ty, epochs=3, generator=T.stream_generator(4, 'net', 1, 'train'))
    assert torch.allclose(flat_params(net), res.params[1], atol=1e-4) and one.acc == res.accs[1]


# ResNet18 at width 4: at width 2 its instance norms see two channels of a few pixels, and on CPUs without AVX-512
# the two engines' different summation orders then end 1.7e-3 apart after one epoch (measured), above float rounding
@pytest.mark.parametrize('net,options', [('lenet', {'channels': (2, 3), 'hidden': (8, 6)}), ('resnet18', {'width': 4})])
def test_vmap_engine_matches_one_by_one(toy_sets, net, options):
    x, y, tx, ty = toy_sets
    p = EvalProtocol(net=net, net_options=options, epochs=1, K=2, batch_size=6)
    v = evaluate_synset(x, y, tx[:8], ty[:8], dataclasses.replace(p, engine='vmap'), keep_params=True)
    s = evaluate_synset(x, y, tx[:8], ty[:8], dataclasses.replace(p, batched=False), keep_params=True)
    assert (v.params - s.params).abs().max() < 1e-4 and v.accs == s.accs
    auto = evaluate_synset(x[:3], y[:3], tx[:8], ty[:8], EvalProtocol(epochs=1, K=1, net=net, net_options=options)).engine
    assert auto == ('stacked' if net == 'lenet' else 'func (one net at a time)')   # 'auto' on the CPU, 3 images


def test_auto_engine_by_device_and_batch():
    conv, res = make_net('convnet', (1, 12, 12), 3, **TINY), make_net('resnet18', (1, 12, 12), 3, width=2)
    assert [pick_engine(conv, True, 'cpu', b) for b in (4, CPU_STACK_MAX_BATCH, 256)] == ['stacked', 'stacked', 'func']
    assert pick_engine(conv, True, 'cuda', 256) == 'stacked' and pick_engine(res, True, 'cuda', 4) == 'vmap'
    assert pick_engine(res, True, 'cpu', 4) == 'func' and pick_engine(conv, False, 'cuda', 4) == 'func'
    assert pick_engine(make_net('resnet18_bn', (1, 12, 12), 3, width=2), True, 'cuda', 4) == 'module'


def test_batch_norm_net_trains_one_at_a_time(toy_sets):
    x, y, tx, ty = toy_sets
    p = EvalProtocol(net='resnet18_bn', net_options={'width': 2}, epochs=1, K=2, dsa=None)
    res = evaluate_synset(x[:6], y[:6], tx[:8], ty[:8], dataclasses.replace(p, batched=True))
    assert res.engine == 'module (one net at a time)' and res.n_nets == 2
    with pytest.raises(ValueError, match='buffers'):
        evaluate_synset(x[:6], y[:6], tx[:8], ty[:8], dataclasses.replace(p, engine='vmap'))


def test_small_set_is_one_batch_per_epoch(monkeypatch, toy_sets):
    x, y, *_ = toy_sets
    calls = []
    real = T.make_grad_fn
    def counting(net, engine):
        fn = real(net, engine)
        def wrapped(W, X, Y):
            calls.append(X.shape[1]); return fn(W, X, Y)
        return wrapped
    monkeypatch.setattr(T, 'make_grad_fn', counting)
    net = make_net('convnet', (1, 12, 12), 3, **TINY)
    W = flat_params(net).unsqueeze(0)
    fit_stack(net, W, x, y, TrainConfig(epochs=3), [torch.Generator()], 'func')
    assert calls == [12, 12, 12]                                          # 12 images < 256: one batch per epoch
    calls.clear()
    fit_stack(net, W, x, y, TrainConfig(epochs=1, batch_size=5), [torch.Generator()], 'func')
    assert calls == [5, 5, 2]


# ---- real data ---------------------------------------------------------------------------------------------

def test_training_on_breastmnist_reduces_loss(breast):
    x, y = breast.train_x[:96], breast.train_y[:96]
    net = make_net('convnet', breast.image_shape, 2, torch.Generator().manual_seed(0), width=8, depth=2)
    res = train_net(net, x, y, breast.test_x, breast.test_y, epochs=6, batch_size=32,
                    generator=torch.Generator().manual_seed(0))
    assert len(res.train_loss) == 6
    assert res.train_loss[-1] < 0.9 * res.train_loss[0], res.train_loss
    assert 0.5 <= res.acc <= 1 and 0 <= res.auc <= 1 and 0 <= res.bal_acc <= 1


def test_baselines_on_breastmnist(breast):
    rr = random_real_baseline(breast, ipc=2, draws=2, K=2, epochs=2, net_options=TINY)
    assert rr.n_nets == 4 and 'ipc 2' in rr.label and rr.engine == 'stacked'
    small = dataclasses.replace(breast, train_x=breast.train_x[:40], train_y=breast.train_y[:40])
    fd = full_data_baseline(small, epochs=2, K=2, net_options=TINY, dsa=None)
    assert fd.n_nets == 2 and fd.label == 'full real data'
    assert abs(majority_class_accuracy(breast.test_y) - 114 / 156) < 1e-9


# ---- soft labels -------------------------------------------------------------------------------------------

def test_soft_labels(toy_sets):
    x, y, tx, ty = toy_sets
    def run(labels, **kw):
        net = make_net('convnet', (1, 12, 12), 3, torch.Generator().manual_seed(0), **TINY)
        r = train_net(net, x, labels, tx, ty, epochs=4, lr=0.05, generator=torch.Generator().manual_seed(0), **kw)
        return r, net
    hard, net_h = run(y)
    onehot, net_o = run(F.one_hot(y, 3).float())                        # probabilities equal to the hard labels
    assert torch.allclose(flat_params(net_h), flat_params(net_o), atol=1e-5)
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(5)) * 3
    soft, net_s = run(logits, soft_target='logits')
    target = logits.softmax(1)
    kl = lambda net: F.kl_div(net(x).log_softmax(1), target, reduction='batchmean').item()
    fresh = make_net('convnet', (1, 12, 12), 3, torch.Generator().manual_seed(0), **TINY)
    assert kl(net_s) < kl(fresh)                                         # the net moved toward the soft targets
    assert soft.train_loss[-1] < soft.train_loss[0]
    with pytest.raises(ValueError, match="soft_target='probs'"):
        run(logits, soft_target='probs')


# ---- metrics -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('classes', [2, 4])
def test_metrics_match_sklearn(classes):
    g = torch.Generator().manual_seed(classes)
    y = torch.randint(0, classes, (50,), generator=g)
    z = torch.randint(-3, 4, (50, classes), generator=g).float()       # integer logits: ties
    p = z.double().softmax(1).numpy()
    ref = (roc_auc_score(y.numpy(), p[:, 1]) if classes == 2 else
           sum(roc_auc_score((y == c).numpy(), p[:, c]) for c in range(classes)) / classes)
    assert auc_ovr(z, y) == pytest.approx(ref, abs=1e-12)
    assert balanced_accuracy(z, y) == pytest.approx(balanced_accuracy_score(y.numpy(), z.argmax(1).numpy()), abs=1e-12)
    assert T.accuracy(z, y) == pytest.approx((z.argmax(1) == y).double().mean().item())


def test_eval_result_numbers():
    r = EvalResult(accs=[0.6, 0.7, 0.8], aucs=[0.5, 0.7, 0.9], bal_accs=[0.5, 0.5, 0.5], epochs=3, seconds=1.0,
                   engine='stacked', lr=0.01)
    assert r.mean == pytest.approx(0.7) and r.std == pytest.approx(math.sqrt(2 / 3) * 0.1)
    assert r.summary() == 'acc 70.0 ± 8.2 (3 nets, final epoch)'
    assert r.to_dict()['reported_at'] == 'final epoch' and r.bal_acc_std == 0
    rec = r.to_dict()                                                  # the record of a run's eval.json
    assert list(rec) == ['acc_mean', 'acc_std', 'accs', 'auc_mean', 'auc_std', 'bal_acc_mean', 'bal_acc_std', 'lr',
                         'nets', 'epochs', 'reported_at', 'device', 'seconds']
    assert (rec['nets'], rec['epochs'], rec['lr'], rec['accs'], rec['seconds']) == (3, 3, 0.01, [0.6, 0.7, 0.8], 1.0)


# ---- bad input ---------------------------------------------------------------------------------------------

def test_errors(toy_sets):
    x, y, tx, ty = toy_sets
    def ev(images=x, labels=y, n_classes=None, **protocol):
        p = EvalProtocol(**{'net_options': TINY, 'epochs': 1, 'K': 1, **protocol})
        return evaluate_synset(images, labels, tx, ty, p, n_classes=n_classes)
    with pytest.raises(ValueError, match='K must be an int >= 1'): ev(K=0)
    with pytest.raises(ValueError, match='epochs must be'): ev(epochs=0)
    with pytest.raises(ValueError, match='11 labels for 12 images'): ev(labels=y[:11])
    with pytest.raises(ValueError, match=r'images of shape \(1, 10, 10\), expected \(1, 12, 12\)'):
        ev(images=x[:, :, :10, :10])
    with pytest.raises(ValueError, match='negative'): ev(labels=y - 1)
    with pytest.raises(ValueError, match='test_y: label 2 is out of range for 2 classes'):
        ev(labels=torch.rand(12, 2).softmax(1))                         # 2-class soft labels, 3-class test set
    with pytest.raises(ValueError, match='columns but there are 3 classes'):
        ev(labels=torch.rand(12, 2), n_classes=3)
    with pytest.raises(ValueError, match='integer class indices'): ev(labels=y.bool())
    with pytest.raises(ValueError, match='engine must be'): ev(engine='fast')
    with pytest.raises(ValueError, match=r'images hold 2 sets \(K, N, ...\) but K=3'):
        ev(images=torch.stack([x, x]), labels=torch.stack([y, y]), K=3)
    with pytest.raises(ValueError, match='TrainConfig.lr'): ev(lr=-1)
    net = make_net('convnet', (1, 12, 12), 3, **TINY)
    with pytest.raises(ValueError, match='label 3 is out of range for 3 classes'):
        train_net(net, x, y + 1, epochs=1)
    with pytest.raises(ValueError, match="engine 'func' or 'module'"):
        train_net(net, x, y, epochs=1, engine='vmap')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_follows_data_and_matches_cpu(toy_sets):
    x, y, tx, ty = toy_sets
    p = EvalProtocol(net_options=TINY, epochs=3, K=2)
    cpu = evaluate_synset(x, y, tx, ty, p, keep_params=True)
    gpu = evaluate_synset(x.cuda(), y.cuda(), tx.cuda(), ty.cuda(), p, keep_params=True)
    assert gpu.params.device.type == 'cuda'
    assert (gpu.params.cpu() - cpu.params).abs().max() < 1e-3           # same seeds, same draws, other kernels
    seq = evaluate_synset(x, y, tx, ty, dataclasses.replace(p, batched=False, device='cuda'), keep_params=True)
    assert (seq.params - gpu.params).abs().max() < 1e-4
