"""ptm_nb.analysis: loss landscapes (centre = the net's loss, reproducible from the generator, no division by zero
on fresh nets, the caller's net untouched, batch norm in eval mode, 3D), t-SNE (shape, reproducibility,
perplexity clipping), the plots, and the networks taken out of a run."""
import copy
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import loss_landscapes
from loss_landscapes.model_interface.model_parameters import ModelParameters, rand_u_like
from ptm_nb.analysis import (ONE_D, Landscape, MeanLoss, class_separation, embedding_frame, evaluation_net,
                             expert_net, filter_normalise, grid_axis, landscape_summary, loss_landscape_2d,
                             net_features, plot_landscape_contours, plot_landscape_surface, plot_tsne,
                             random_direction, tsne_2d)
from ptm_nb.data import MedDataset
from ptm_nb.nets import flat_params, make_net

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py

TINY = {'width': 4, 'depth': 2}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data(shape=(1, 12, 12), n=24, classes=3, seed=0):
    "Class-dependent random images (a learnable problem without real data)."
    y = torch.arange(n) % classes
    return torch.randn(n, *shape, generator=gen(seed)) + y.view(-1, *[1] * len(shape)).float(), y


def own_loss(net, x, y):
    with torch.no_grad(): return F.cross_entropy(copy.deepcopy(net).eval()(x), y).item()


# ---- directions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,options', [('convnet', TINY), ('resnet18_bn', {'width': 4}), ('lenet', {'norm': 'instance'}),
                                          ('convnet', {**TINY, 'norm': 'batch'})])
@pytest.mark.parametrize('one_d', ONE_D)
def test_filter_normalisation_never_divides_by_zero_on_fresh_nets(name, options, one_d):
    "Fresh nets have all-zero norm shifts; the package raises on them, the directions here stay finite."
    net = make_net(name, (1, 28, 28), 3, gen(0), **options)
    assert any(p.dim() == 1 and not p.detach().abs().sum() for p in net.parameters())        # there is a zero vector
    d = random_direction(net, gen(1), one_d)
    assert d.shape == flat_params(net).shape and torch.isfinite(d).all()
    ls = loss_landscape_2d(net, *data((1, 28, 28), n=6), distance=1.0, steps=3, generator=gen(1), one_d=one_d)
    assert np.isfinite(ls.losses).all()
    theta = ModelParameters([p.detach().clone() for p in net.parameters()])
    with pytest.raises(ZeroDivisionError):                  # the defect this module works around (ENV.md)
        torch.manual_seed(0); rand_u_like(theta).filter_normalize_(theta)


def test_filter_norms_match_the_weights_and_options():
    net = make_net('convnet', (3, 16, 16), 4, gen(0), **TINY)
    params = list(net.parameters())
    raw = [torch.randn(p.shape, generator=gen(k)) for k, p in enumerate(params)]
    out = filter_normalise(raw, params, 'zero')
    for d, p, r in zip(out, params, raw):
        if p.dim() > 1:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5)
            cos = F.cosine_similarity(d.flatten(1), r.flatten(1), dim=1)                     # only rescaled
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
        else: assert not d.any()
    copied = filter_normalise(raw, params, 'copy')
    assert all(torch.equal(d, p.detach()) for d, p in zip(copied, params) if p.dim() == 1)
    scaled = filter_normalise(raw, params, 'scale')
    assert all(torch.allclose(d.norm(), p.detach().norm()) for d, p in zip(scaled, params) if p.dim() == 1)
    zero_rows = [torch.zeros_like(p) for p in params]                  # a zero random filter: zero, not NaN
    assert all(not d.any() for d in filter_normalise(zero_rows, params, 'scale'))
    with pytest.raises(ValueError, match="one_d must be one of"): filter_normalise(raw, params, 'biasbn')
    with pytest.raises(ValueError, match='direction tensors for'): filter_normalise(raw[:-1], params)
    with pytest.raises(TypeError, match='needs a torch.Generator'): random_direction(net, 0)


def test_directions_do_not_touch_the_global_generator():
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY)
    state = torch.get_rng_state()
    random_direction(net, gen(1)); loss_landscape_2d(net, *data(n=6), steps=3, generator=gen(1))
    assert torch.equal(torch.get_rng_state(), state)


# ---- the landscape ------------------------------------------------------------------------------------------

def test_centre_is_the_loss_and_grid_is_reproducible():
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY)
    x, y = data()
    alphas, betas, losses = ls = loss_landscape_2d(net, x, y, distance=0.5, steps=5, generator=gen(7), batch=7)
    assert losses.shape == (5, 5) and np.isfinite(losses).all()
    assert np.array_equal(alphas, [-0.5, -0.25, 0, 0.25, 0.5]) and np.array_equal(alphas, betas)
    assert abs(ls.centre - own_loss(net, x, y)) < 1e-6
    assert np.array_equal(loss_landscape_2d(net, x, y, 0.5, 5, gen(7), batch=7).losses, losses)
    assert not np.allclose(loss_landscape_2d(net, x, y, 0.5, 5, gen(8)).losses, losses)


def test_grid_points_are_the_plane_of_the_drawn_directions():
    "Each grid value is the loss at θ* + αδ + βη with δ, η the first two directions the generator gives."
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY)
    x, y = data()
    ls = loss_landscape_2d(net, x, y, distance=1.0, steps=3, generator=gen(3))
    g = gen(3); d1, d2 = random_direction(net, g), random_direction(net, g)
    probe, theta = copy.deepcopy(net), flat_params(net)
    for i, j in [(0, 0), (0, 2), (2, 1)]:
        from ptm_nb.nets import load_flat
        load_flat(probe, theta + ls.alphas[i] * d1 + ls.betas[j] * d2)
        assert abs(own_loss(probe, x, y) - ls.losses[i, j]) < 1e-5
    same = loss_landscape_2d(net, x, y, 1.0, 3, directions=(d1, d2))
    assert np.allclose(same.losses, ls.losses, atol=1e-7)
    with pytest.raises(ValueError, match='flat vectors of'): loss_landscape_2d(net, x, y, 1.0, 3, directions=(d1[:-1], d2))


def test_the_callers_net_is_untouched():
    "loss_landscapes moves the model in place and freezes it; the copy here does not."
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY).train()
    w = flat_params(net)
    loss_landscape_2d(net, *data(n=6), steps=3, generator=gen(1))
    assert torch.equal(flat_params(net), w) and net.training and all(p.requires_grad for p in net.parameters())


def test_batch_norm_net_is_measured_in_eval_mode():
    net = make_net('resnet18_bn', (1, 12, 12), 3, gen(0), width=4)
    x, y = data()
    net.train(); net(x * 3 + 1)                                        # running statistics now differ from batch ones
    ls = loss_landscape_2d(net, x, y, steps=3, generator=gen(2))
    with torch.no_grad(): train_mode_loss = F.cross_entropy(copy.deepcopy(net).train()(x), y).item()
    assert abs(ls.centre - own_loss(net, x, y)) < 1e-6 and abs(ls.centre - train_mode_loss) > 1e-4
    assert net.training


@pytest.mark.parametrize('name,shape,options', [('convnet', (1, 8, 8, 8), TINY), ('resnet18', (1, 16, 16, 16), {'width': 2})])
def test_3d_nets(name, shape, options):
    x, y = data(shape, n=9)
    net = make_net(name, shape, 3, gen(0), **options)
    ls = loss_landscape_2d(net, x, y, distance=0.5, steps=3, generator=gen(1))
    assert np.isfinite(ls.losses).all() and abs(ls.centre - own_loss(net, x, y)) < 1e-6
    f = net_features(net, x, batch=4)
    assert f.shape[0] == 9 and f.dim() == 2 and f.device.type == 'cpu'
    with torch.no_grad(): assert torch.allclose(net.classifier(f), net(x), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_net_gives_the_cpu_landscape():
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY)
    x, y = data()
    cpu = loss_landscape_2d(net, x, y, steps=3, generator=gen(1))
    gpu = loss_landscape_2d(copy.deepcopy(net).cuda(), x, y, steps=3, generator=gen(1))
    assert np.allclose(cpu.losses, gpu.losses, atol=1e-4)


def test_bad_grid_and_metric_input():
    for steps in (4, 1, 2.5, True):
        with pytest.raises(ValueError, match='odd int >= 3'): grid_axis(1.0, steps)
    for distance in (0, -1, float('nan')):
        with pytest.raises(ValueError, match='distance must be a positive number'): grid_axis(distance, 5)
    with pytest.raises(ValueError, match='3 inputs and 2 targets'): MeanLoss(F.cross_entropy, torch.zeros(3, 1), torch.zeros(2))


def test_mean_loss_is_the_packages_loss_in_batches():
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY).eval()
    x, y = data(n=30)
    ref = loss_landscapes.point(copy.deepcopy(net), loss_landscapes.metrics.Loss(F.cross_entropy, x, y))
    for batch in (1, 7, 30, 100):
        assert abs(loss_landscapes.point(copy.deepcopy(net), MeanLoss(F.cross_entropy, x, y, batch)) - ref) < 1e-6


def test_summary_of_a_known_bowl():
    ax = grid_axis(2.0, 9)
    ls = Landscape(ax, ax, 0.5 + np.add.outer(ax ** 2, ax ** 2))
    s = landscape_summary(ls)
    assert s['centre_loss'] == 0.5 and s['min_loss'] == 0.5 and s['max_loss'] == 8.5
    inside = [(a * a + b * b) for a in ax for b in ax if math.hypot(a, b) <= 1.0]
    assert abs(s['mean_rise_half'] - np.mean(inside)) < 1e-12


def test_plots_return_figures():
    net = make_net('convnet', (1, 12, 12), 3, gen(0), **TINY)
    ls = loss_landscape_2d(net, *data(n=6), steps=3, generator=gen(1))
    fig = plot_landscape_contours({'a': ls, 'b': ls}, title='t')
    assert isinstance(fig, Figure) and len(fig.axes) == 3 and fig.axes[0].get_title().startswith('a')
    assert isinstance(plot_landscape_surface(ls), Figure) and len(plot_landscape_surface({'a': ls, 'b': ls}).axes) == 2
    with pytest.raises(TypeError, match='Landscape'): plot_landscape_contours({'a': 1})
    e = tsne_2d(torch.randn(10, 4, generator=gen(0)), seed=0)
    frame = embedding_frame(e, torch.arange(10) % 2, 'real', 'p', ['no', 'yes'])
    assert len(plot_tsne(frame).axes) == 1
    with pytest.raises(ValueError, match='10 points but 3 labels'): embedding_frame(e, torch.arange(3), 'real')


# ---- features and t-SNE -------------------------------------------------------------------------------------

def test_features_are_the_classifiers_input():
    net = make_net('convnet', (3, 16, 16), 4, gen(0), **TINY).train()
    x, _ = data((3, 16, 16), n=10)
    f = net_features(net, x, batch=3)
    assert f.shape == (10, 4 * 4 * 4) and net.training
    with torch.no_grad(): assert torch.allclose(net.classifier(f), net(x), atol=1e-5)
    with pytest.raises(TypeError, match='has no .features'): net_features(nn.Linear(3, 2), torch.zeros(2, 3))


def test_tsne_shape_reproducibility_and_perplexity_clipping():
    feats = torch.randn(40, 16, generator=gen(0))
    e = tsne_2d(feats, seed=3, perplexity=10)
    assert e.shape == (40, 2) and np.isfinite(e).all()
    assert np.array_equal(tsne_2d(feats, seed=3, perplexity=10), e)
    r = tsne_2d(feats, seed=3, perplexity=10, init='random', max_iter=250)
    assert np.array_equal(tsne_2d(feats, seed=3, perplexity=10, init='random', max_iter=250), r)
    assert not np.allclose(tsne_2d(feats, seed=4, perplexity=10, init='random', max_iter=250), r)
    assert tsne_2d(feats[:4], seed=0).shape == (4, 2)                   # perplexity 30 clipped below 4 points
    with pytest.raises(ValueError, match='N >= 3'): tsne_2d(feats[:2], seed=0)
    with pytest.raises(ValueError, match='NaN or inf'): tsne_2d(torch.full((5, 2), float('nan')), seed=0)


def test_class_separation():
    g = gen(0)
    blobs = torch.cat([torch.randn(15, 3, generator=g) + 8, torch.randn(15, 3, generator=g) - 8])
    labels = torch.arange(30) // 15
    assert class_separation(blobs, labels) > 0.8 > class_separation(blobs, torch.arange(30) % 2)
    assert math.isnan(class_separation(blobs, torch.zeros(30)))


# ---- networks out of a run ----------------------------------------------------------------------------------

def generated(n_train=40, n_test=24):
    def split(n, seed):
        y = torch.arange(n) % 2
        x = torch.randn(n, 1, 16, 16, generator=gen(seed)) * 0.5
        x[:, :, 4:12, 4:12] += (2 * y.float() - 1).view(-1, 1, 1, 1)
        return x, y
    (a, b), (c, d), (e, f) = split(n_train, 0), split(8, 1), split(n_test, 2)
    return MedDataset(name='blobs_analysis', train_x=a, train_y=b, val_x=c, val_y=d, test_x=e, test_y=f,
                      mean=torch.zeros(1), std=torch.ones(1), class_names=['dark', 'bright'], n_classes=2, channels=1,
                      image_shape=(1, 16, 16), is_3d=False, modality='generated', source='generated')


def test_evaluation_and_expert_nets_of_a_run(tmp_path):
    from ptm_nb.runs import RunSpec, experts_for, run
    ds = generated()
    res = run(RunSpec('ptm', ds.name, 2, 'smoke', device='cpu'), root=tmp_path, dataset=ds, progress=False)
    net, ev = evaluation_net(res, ds)
    assert not net.training and ev.n_nets == 1 and ev.epochs == res.eval['epochs']
    assert abs(ev.accs[0] - res.eval['accs'][0]) < 0.05                   # the run's net 0, up to float rounding
    with torch.no_grad(): acc = (net(ds.test_x).argmax(1) == ds.test_y).double().mean().item()
    assert abs(acc - ev.accs[0]) < 1e-9                                  # the module is the net that was scored
    buf = experts_for(ds, res.folder.config, tmp_path, 'cpu', progress=False)
    assert torch.equal(flat_params(expert_net(res, ds)), buf.snapshot(0, buf.epochs))
    assert torch.equal(flat_params(expert_net(res, ds, index=1, epoch=1)), buf.snapshot(1, 1))
    rnd = run(RunSpec('random', ds.name, 2, 'smoke', device='cpu'), root=tmp_path, dataset=ds, progress=False)
    with pytest.raises(ValueError, match='uses no experts'): expert_net(rnd, ds)
    with pytest.raises(ValueError, match='RunResult'): evaluation_net(object(), ds)
