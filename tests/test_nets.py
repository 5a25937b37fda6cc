"""ptm_nb.nets: every network on every input shape of the benchmark (2D 28/32/64/112 px with 1 or 3 channels,
3D 28³ and 64³), its functional view (equal to the module, under vmap, under double backward), generator-driven
initialisation and the error messages. Widths are small so the grid runs in seconds."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

from ptm_nb.nets import (NETS, BatchNorm, FlatNet, flat_params, functional, init_params, load_flat, make_net,
                         net_options, num_params)

SHAPES = [(1, 28, 28), (3, 28, 28), (3, 32, 32), (3, 64, 64), (3, 112, 112), (1, 28, 28, 28), (1, 64, 64, 64)]
SMALL = {'convnet': dict(width=4), 'lenet': {}, 'alexnet': dict(channels=(4, 6, 8, 6, 6)),
         'resnet18': dict(width=2), 'resnet18_bn': dict(width=2)}
NUM_CLASSES = 3


def _gen(seed): return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def test_registry_names():
    assert sorted(NETS) == ['alexnet', 'convnet', 'lenet', 'resnet18', 'resnet18_bn'] == sorted(SMALL)


@pytest.mark.parametrize('in_shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('name', sorted(SMALL))
def test_net_on_shape(name, in_shape):
    net = make_net(name, in_shape, NUM_CLASSES, _gen(0), **SMALL[name])
    g = _gen(1)
    big3d = len(in_shape) == 4 and in_shape[1] > 32
    batch = 1 if big3d else 2
    x = torch.randn(batch, *in_shape, generator=g)
    # forward shape and a backward reaching every parameter
    out = net(x)
    assert out.shape == (batch, NUM_CLASSES) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2][:batch])).backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0
    # the functional view equals the module call (train mode: batch norm uses batch statistics in both)
    f, theta = functional(net), flat_params(net)
    assert theta.shape == (num_params(net),)
    with torch.no_grad():
        assert torch.allclose(f(theta, x), net(x), atol=1e-5, rtol=1e-4)
        if big3d and name.startswith('resnet'): return   # seconds on 2 cores; vmap of the 3D ResNet: 28³ case
        # vmap over K = 2 different networks equals a loop
        thetas = torch.stack([theta, flat_params(make_net(name, in_shape, NUM_CLASSES, _gen(5), **SMALL[name]))])
        xs = torch.randn(2, batch, *in_shape, generator=g)
        batched = vmap(f)(thetas, xs)
        looped = torch.stack([f(thetas[k], xs[k]) for k in range(2)])
    assert batched.shape == (2, batch, NUM_CLASSES)
    assert torch.allclose(batched, looped, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(looped[0], looped[1])


@pytest.mark.parametrize('name', sorted(SMALL))
def test_generator_reproducibility_and_global_rng(name):
    shape = (3, 32, 32)
    state = torch.get_rng_state()
    a = make_net(name, shape, 4, _gen(7), **SMALL[name])
    assert torch.equal(torch.get_rng_state(), state), 'make_net moved the global random generator'
    torch.manual_seed(999)                                            # the global generator must not matter
    b = make_net(name, shape, 4, _gen(7), **SMALL[name])
    c = make_net(name, shape, 4, _gen(8), **SMALL[name])
    assert torch.equal(flat_params(a), flat_params(b))
    assert not torch.equal(flat_params(a), flat_params(c))
    # None means a fresh generator seeded 0
    assert torch.equal(flat_params(make_net(name, shape, 4, **SMALL[name])),
                       flat_params(make_net(name, shape, 4, _gen(0), **SMALL[name])))
    # float64 nets get the same numbers
    d = make_net(name, shape, 4, _gen(7), dtype=torch.float64, **SMALL[name])
    assert d.features[0].weight.dtype == torch.float64
    assert torch.equal(flat_params(d).float(), flat_params(a))


def test_init_distribution_matches_torch_default():
    "Weights and biases uniform in ±1/sqrt(fan_in) (torch's default), norms 1/0, buffers reset."
    net = make_net('resnet18_bn', (3, 32, 32), 10, _gen(0), width=16)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            assert m.weight.abs().max() <= bound
            if m.weight.numel() > 1000:                               # enough draws to come near the bound
                assert m.weight.abs().max() > 0.95 * bound
                assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        if isinstance(m, BatchNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    # init_params re-draws in place from a generator, reproducibly, also after training moved the buffers
    net.train()(torch.randn(4, 3, 32, 32))
    init_params(net, _gen(0))
    assert torch.equal(flat_params(net), flat_params(make_net('resnet18_bn', (3, 32, 32), 10, _gen(0), width=16)))
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in net.modules() if isinstance(m, BatchNorm))


def test_init_params_rejects_unknown_parameters():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"no rule for the parameters \['scale'\]"):
        init_params(Odd(), _gen(0))
    with pytest.raises(TypeError, match='needs a torch.Generator'):
        init_params(nn.Linear(2, 2), 0)


def test_parameter_counts_follow_the_architectures():
    # ConvNet-3 width 128 on CIFAR-size input: the 320,010 weights of DC/MTT
    assert num_params(make_net('convnet', (3, 32, 32), 10)) == 320010
    # LeNet-5 on MNIST with padding 2: 61,706
    assert num_params(make_net('lenet', (1, 28, 28), 10)) == 61706
    # AlexNet of DC on 32 px: five convolutions and one linear layer from 192*4*4 features
    convs = [(3, 128, 5), (128, 192, 5), (192, 256, 3), (256, 192, 3), (192, 192, 3)]
    expected = sum(i * o * k * k + o for i, o, k in convs) + 192 * 4 * 4 * 10 + 10
    assert num_params(make_net('alexnet', (3, 32, 32), 10)) == expected
    # ResNet18 with the 3x3 stem on CIFAR-10: 11,173,962; batch norm has the same parameters as instance norm
    assert num_params(make_net('resnet18_bn', (3, 32, 32), 10)) == 11173962
    # 112 px takes the ImageNet stem, and global pooling keeps the classifier at 512 inputs
    r = make_net('resnet18', (3, 112, 112), 7, width=8)
    assert r.features[0].kernel_size == (7, 7) and r.classifier.in_features == 64
    # ConvNet flattened sizes are computed from the input shape
    for shape, feat in [((1, 28, 28), 3 * 3), ((3, 112, 112), 14 * 14), ((1, 28, 28, 28), 27), ((1, 64, 64, 64), 512)]:
        assert make_net('convnet', shape, 2, width=4).classifier.in_features == 4 * feat


@pytest.mark.parametrize('norm', ['instance', 'batch', 'layer', 'none'])
@pytest.mark.parametrize('act', ['relu', 'leakyrelu', 'sigmoid'])
@pytest.mark.parametrize('pool', ['avg', 'max', 'none'])
def test_convnet_options(norm, act, pool):
    net = make_net('convnet', (1, 16, 16), 2, _gen(0), width=4, depth=2, norm=norm, act=act, pool=pool)
    x = torch.randn(3, 1, 16, 16, generator=_gen(1))
    f = functional(net)
    assert torch.allclose(f(flat_params(net), x), net(x), atol=1e-5)
    side = 16 if pool == 'none' else 4
    assert net.classifier.in_features == 4 * side * side


def test_batchnorm_functional_mode_uses_batch_statistics_and_leaves_buffers():
    net = make_net('convnet', (3, 16, 16), 2, _gen(0), width=4, depth=2, norm='batch')
    bn = net.features[1]
    x = torch.randn(6, 3, 16, 16, generator=_gen(1))
    f, theta = functional(net), flat_params(net)
    y_train = f(theta, x)
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
    net.eval()
    assert torch.allclose(f(theta, x), y_train, atol=1e-6)            # batch statistics in eval mode too
    assert not torch.allclose(net(x), y_train, atol=1e-3)             # the module in eval uses the buffers
    net.train(); net(x)
    assert not torch.equal(bn.running_mean, torch.zeros(4))           # the module call updates them


def test_double_backward_matches_finite_differences(one_thread):
    "One differentiable SGD step, then a loss: gradient wrt the images and the step size (float64)."
    for in_shape in [(1, 4, 4), (1, 4, 4, 4)]:
        g = _gen(0)
        net = make_net('convnet', in_shape, 3, g, dtype=torch.float64, width=2, depth=1)
        f, theta0 = functional(net), flat_params(net).requires_grad_(True)
        y = torch.tensor([0, 2])

        def after_one_step(x, lr):
            loss = F.cross_entropy(f(theta0, x), y)
            theta1 = theta0 - lr * torch.autograd.grad(loss, theta0, create_graph=True)[0]
            return F.cross_entropy(f(theta1, x), y)

        x = torch.randn(2, *in_shape, dtype=torch.float64, generator=g, requires_grad=True)
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(after_one_step, (x, lr), fast_mode=len(in_shape) == 4)
        # second derivatives of the network itself wrt weights and input (random projections)
        xs = torch.randn(1, *in_shape, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda t, x: f(t, x), (theta0, xs), fast_mode=True)


def test_vmap_gradients_equal_per_net_gradients():
    "K nets trained under vmap: per-net gradients of the batched loss equal the gradients of each net alone."
    g = _gen(0)
    nets = [make_net('resnet18_bn', (3, 16, 16), 3, _gen(k), width=2) for k in range(3)]
    f = functional(nets[0])
    thetas = torch.stack([flat_params(n) for n in nets])
    xs, ys = torch.randn(3, 4, 3, 16, 16, generator=g), torch.randint(0, 3, (3, 4), generator=g)
    loss = lambda t, x, y: F.cross_entropy(f(t, x), y)
    grads = vmap(torch.func.grad(loss))(thetas, xs, ys)
    for k in range(3):
        t = thetas[k].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(loss(t, xs[k], ys[k]), t)
        assert torch.allclose(grads[k], ref, atol=1e-5, rtol=1e-4)


def test_flat_round_trip_and_errors():
    net = make_net('lenet', (1, 28, 28), 10, _gen(0))
    theta = flat_params(net)
    other = make_net('lenet', (1, 28, 28), 10, _gen(1))
    load_flat(other, theta)
    assert torch.equal(flat_params(other), theta)
    theta[0] += 1                                                      # flat_params returns a copy
    assert not torch.equal(flat_params(net), theta)
    with pytest.raises(ValueError, match='expected a 1-D vector of 61706 values'):
        load_flat(net, theta[:-1])
    f = functional(net)
    assert isinstance(f, FlatNet) and f.num_params == 61706
    with pytest.raises(ValueError, match='use torch.func.vmap'):
        f(torch.stack([theta, theta]), torch.randn(2, 1, 28, 28))
    assert set(f.unflatten(theta)) == {n for n, _ in net.named_parameters()}


def test_make_net_errors():
    with pytest.raises(ValueError, match=r"unknown network 'vgg'; known networks: \['alexnet', 'convnet'"):
        make_net('vgg', (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"unknown options \['depht'\]"):
        make_net('convnet', (3, 32, 32), 10, depht=2)
    with pytest.raises(ValueError, match=r'in_shape must be \(C, H, W\)'):
        make_net('convnet', (32, 32), 10)
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
        make_net('convnet', (3, 32, 32), 0)
    with pytest.raises(ValueError, match="norm must be one of"):
        make_net('convnet', (3, 32, 32), 10, norm='instancenorm')
    with pytest.raises(ValueError, match="act must be one of"):
        make_net('convnet', (3, 32, 32), 10, act='gelu')
    with pytest.raises(ValueError, match="pool must be one of"):
        make_net('convnet', (3, 32, 32), 10, pool='median')
    with pytest.raises(ValueError, match=r'alexnet: input shape \(1, 3, 3\) is too small'):
        make_net('alexnet', (1, 3, 3), 2)
    assert net_options('convnet') == dict(width=128, depth=3, norm='instance', act='relu', pool='avg',
                                          first_padding=1)
    assert net_options('resnet18_bn')['norm'] == 'batch'


def test_first_padding_gives_the_mtt_geometry():
    "DC/MTT pad the first conv by 3 for 28 px single-channel images: 28 -> 32 -> ... -> 4x4."
    net = make_net('convnet', (1, 28, 28), 2, width=4, first_padding=3)
    assert net.classifier.in_features == 4 * 4 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_same_weights_and_outputs():
    cpu = make_net('resnet18', (3, 32, 32), 4, _gen(3), width=8)
    gpu = make_net('resnet18', (3, 32, 32), 4, _gen(3), width=8, device='cuda')
    assert torch.equal(flat_params(gpu).cpu(), flat_params(cpu))
    x = torch.randn(2, 3, 32, 32)
    f = functional(gpu)
    assert torch.allclose(f(flat_params(gpu), x.cuda()).cpu(), cpu(x), atol=2e-3)   # cuDNN convs use TF32
    # a CUDA generator, vmap over K nets and a differentiable step on the GPU
    nets = [make_net('resnet18_bn', (1, 16, 16, 16), 2, torch.Generator('cuda').manual_seed(k), width=4,
                     device='cuda') for k in range(2)]
    f = functional(nets[0])
    thetas = torch.stack([flat_params(n) for n in nets]).requires_grad_(True)
    xs = torch.randn(2, 3, 1, 16, 16, 16, device='cuda', requires_grad=True)
    loss = lambda t, x: F.cross_entropy(f(t, x), torch.tensor([0, 1, 1], device='cuda'))
    g1 = vmap(torch.func.grad(loss))(thetas, xs)
    out = vmap(loss)(thetas - 0.1 * g1, xs).sum()
    gx, = torch.autograd.grad(out, xs)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
