"""ptm_nb.augment (DSA): every operation differentiable in the images (gradcheck, float64, 2D and 3D), siamese
draws, reproducibility from a seed, ranges of the drawn parameters, shapes for 1 and 3 channels, errors."""
import math
import pytest
import torch

from ptm_nb.augment import OPS, DSAConfig, DSADraw, cutout_mask, dsa, dsa_apply, dsa_draw, rotation_matrices


def _gen(seed): return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('shape', [(2, 1, 6, 6), (2, 3, 4, 4), (2, 1, 4, 4, 4)], ids=['2d-1ch', '2d-3ch', '3d'])
def test_gradcheck_each_operation(op, shape):
    "With the draw fixed, each op is (piecewise) linear in x: its gradient wrt x must equal finite differences."
    nd = len(shape) - 2
    x = torch.randn(*shape, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    for seed in range(2):                                              # two draws: flips on and off, etc.
        draw = dsa_draw(DSAConfig(op), shape[0], nd, _gen(seed))
        assert draw.op == op
        assert torch.autograd.gradcheck(lambda x: dsa_apply(x, draw), (x,))
    # the gradient reaches x and x is never written in place
    before = x.detach().clone()
    dsa_apply(x, draw).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize('op', (*OPS, 'none'))
@pytest.mark.parametrize('shape', [(3, 1, 28, 28), (3, 3, 28, 28), (3, 3, 32, 32), (3, 1, 112, 112),
                                   (2, 1, 28, 28, 28), (2, 3, 16, 16, 16)])
def test_shapes_dtypes_preserved(op, shape):
    x = torch.randn(*shape, generator=_gen(1))
    y = dsa(x, DSAConfig(op), _gen(2))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    if op == 'none': assert torch.equal(y, x)


def test_siamese_one_draw_two_batches():
    "One draw applied to a real and a synthetic batch: sample i of either batch gets parameters i."
    for nd, shape in [(2, (1, 16, 16)), (3, (1, 8, 8, 8))]:
        g = _gen(3)
        real, syn = torch.randn(10, *shape, generator=g), torch.randn(4, *shape, generator=g)
        for op in OPS:
            draw = dsa_draw(DSAConfig(op), len(real), nd, g)
            # the same batch twice -> the same output
            assert torch.equal(dsa_apply(syn, draw), dsa_apply(syn, draw))
            # syn placed in the first rows of a real batch is transformed exactly as on its own
            mixed = torch.cat([syn, real[4:]])
            out = dsa_apply(mixed, draw)
            assert torch.equal(out[:4], dsa_apply(syn, draw))
            assert torch.equal(out[4:], dsa_apply(real, draw)[4:])


def test_same_seed_same_output_different_seed_different():
    x = torch.randn(8, 3, 16, 16, generator=_gen(0))
    vol = torch.randn(4, 1, 8, 8, 8, generator=_gen(0))
    for batch in (x, vol):
        a = [dsa(batch, DSAConfig(), _gen(11)) for _ in range(2)]
        assert torch.equal(a[0], a[1])
        # the global random generator plays no part
        torch.manual_seed(0); b = dsa(batch, DSAConfig(), _gen(11))
        torch.manual_seed(1); c = dsa(batch, DSAConfig(), _gen(11))
        assert torch.equal(b, a[0]) and torch.equal(c, a[0])
        outs = [dsa(batch, DSAConfig(), _gen(s)) for s in range(12, 18)]
        assert all(not torch.equal(o, a[0]) for o in outs)
    # same op, different seeds: different per-sample parameters
    d1, d2 = (dsa_draw(DSAConfig('rotate'), 8, 2, _gen(s)) for s in (1, 2))
    assert not torch.equal(d1.params['theta'], d2.params['theta'])
    # successive calls on one generator differ (the stream advances)
    g = _gen(4)
    assert not torch.equal(dsa(x, DSAConfig('color'), g), dsa(x, DSAConfig('color'), g))


def test_parameter_ranges_match_dsa():
    g, n, cfg = _gen(5), 4000, DSAConfig()
    p = dsa_draw(DSAConfig('color'), n, 2, g).params
    assert p['brightness'].min() >= -0.5 and p['brightness'].max() < 0.5 and p['brightness'].max() > 0.49
    assert p['saturation'].min() >= 0 and p['saturation'].max() < 2 and p['saturation'].max() > 1.98
    assert p['contrast'].min() >= 0.5 and p['contrast'].max() < 1.5
    # crop: integer shifts uniform over [-s, s], s = round(0.125 * 28) = 4
    x = torch.zeros(n, 1, 28, 28); x[:, :, 14, 14] = 1                 # a single bright pixel
    y = dsa_apply(x, dsa_draw(DSAConfig('crop'), n, 2, g))
    rows, cols = (y[:, 0] == 1).nonzero()[:, 1:].T
    assert len(rows) == n                                              # the pixel always stays inside
    shifts = torch.stack([14 - rows, 14 - cols])                      # out[i] = x[i + shift]
    assert shifts.min() == -4 and shifts.max() == 4
    counts = torch.bincount((shifts + 4).flatten(), minlength=9).float()
    assert (counts / counts.sum() - 1 / 9).abs().max() < 0.02
    # flip: about half of the samples, horizontal only in 2D; one random axis in 3D
    f2 = dsa_draw(DSAConfig('flip'), n, 2, g).params['flags']
    assert not f2[:, 0].any() and abs(f2[:, 1].float().mean() - 0.5) < 0.03
    f3 = dsa_draw(DSAConfig('flip'), n, 3, g).params['flags']
    assert (f3.sum(1) <= 1).all() and abs(f3.any(1).float().mean() - 0.5) < 0.03
    assert (f3.float().mean(0) - 1 / 6).abs().max() < 0.03
    # scale: per-axis factors in [1/1.2, 1.2], no shear, no translation
    th = dsa_draw(DSAConfig('scale'), n, 3, g).params['theta']
    diag = th.diagonal(dim1=1, dim2=2)
    assert diag.min() >= 1 / 1.2 - 1e-6 and diag.max() <= 1.2 + 1e-6 and diag.max() > 1.19
    assert torch.equal(th[:, :, :3], torch.diag_embed(diag)) and torch.equal(th[:, :, 3], torch.zeros(n, 3))
    # rotate: 2D angles uniform in +-15 degrees; 3D rotation angles up to 15 degrees about spread-out axes
    th2 = dsa_draw(DSAConfig('rotate'), n, 2, g).params['theta']
    ang = torch.atan2(th2[:, 1, 0], th2[:, 0, 0])
    assert ang.abs().max() <= math.radians(15) + 1e-6 and ang.abs().max() > math.radians(14.8)
    R = dsa_draw(DSAConfig('rotate'), n, 3, g).params['theta'][:, :, :3]
    cos = ((R.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)
    assert torch.arccos(cos).max() <= math.radians(15) + 1e-4
    axis = torch.stack([R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], 1)
    axis = axis / axis.norm(dim=1, keepdim=True)
    assert axis.mean(0).abs().max() < 0.05 and (axis.abs().max(1).values > 0.95).float().mean() < 0.5


def test_cutout_geometry_2d_and_3d():
    "A box of side round(0.5*size) (clipped at the border), the same for every channel; a cube in 3D."
    g = _gen(6)
    u = torch.rand(500, 2, generator=g)
    m = cutout_mask((28, 28), u, 0.5)
    holes = 1 - m
    rows, cols = holes.amax(2), holes.amax(1)
    assert torch.equal(holes.sum((1, 2)), rows.sum(1) * cols.sum(1))     # rectangular
    assert rows.sum(1).max() == 14 and cols.sum(1).min() >= 7           # side 14, at least half inside
    assert torch.equal(cutout_mask((28, 28), torch.full((1, 2), 0.5), 0.5)[0, 7:21, 7:21], torch.zeros(14, 14))
    m3 = cutout_mask((8, 8, 8), torch.rand(200, 3, generator=g), 0.5)
    assert ((1 - m3).sum((1, 2, 3)) <= 64).all() and ((1 - m3).sum((1, 2, 3)) == 64).any()
    x = torch.randn(3, 3, 8, 8, 8, generator=g)
    d = dsa_draw(DSAConfig('cutout'), 3, 3, g)
    y = dsa_apply(x, d)
    assert torch.equal(y, x * cutout_mask((8, 8, 8), d.params['u'], 0.5)[:, None])


def test_rotation_matrices_rodrigues():
    axis = torch.tensor([[0., 0, 1], [1, 0, 0]])
    R = rotation_matrices(axis, torch.tensor([math.pi / 2, math.pi]))
    assert torch.allclose(R[0], torch.tensor([[0., -1, 0], [1, 0, 0], [0, 0, 1]]), atol=1e-6)
    assert torch.allclose(R[1], torch.diag(torch.tensor([1., -1, -1])), atol=1e-6)


def test_3d_affine_about_axis_matches_2d_slices():
    "A 3D rotation about the depth axis is the 2D rotation applied to every depth slice."
    g = _gen(7)
    vol = torch.randn(2, 1, 5, 9, 9, generator=g)
    angle = torch.tensor([0.2, -0.25])
    R3 = rotation_matrices(torch.tensor([[0., 0, 1], [0, 0, 1]]), angle)   # z of affine_grid = the D axis
    d3 = DSADraw('rotate', 3, 2, {'theta': torch.cat([R3, torch.zeros(2, 3, 1)], 2)})
    d2 = DSADraw('rotate', 2, 2, {'theta': torch.cat([R3[:, :2, :2], torch.zeros(2, 2, 1)], 2)})
    out3 = dsa_apply(vol, d3)
    for k in range(5):
        assert torch.allclose(out3[:, :, k], dsa_apply(vol[:, :, k], d2), atol=1e-5)


def test_leading_dims_and_large_batches():
    "x of shape (K, B, ...) uses the parameters of the flattened K*B samples."
    g = _gen(8)
    x = torch.randn(3, 4, 3, 12, 12, generator=g)
    for op in OPS:
        d = dsa_draw(DSAConfig(op), 12, 2, g)
        assert torch.equal(dsa_apply(x, d), dsa_apply(x.flatten(0, 1), d).view_as(x))


def test_float64_and_identity_strategy():
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=_gen(9))
    assert dsa(x, DSAConfig(), _gen(0)).dtype == torch.float64
    for s in ('none', ''):
        d = dsa_draw(DSAConfig(s), 2, 2, _gen(0))
        assert d.op == 'none' and torch.equal(dsa_apply(x, d), x)


def test_errors():
    with pytest.raises(ValueError, match=r"unknown operations \['blur'\]"):
        DSAConfig('color_blur')
    with pytest.raises(ValueError, match='DSAConfig.scale must be >= 1'):
        DSAConfig(scale=0.8)
    with pytest.raises(ValueError, match='DSAConfig.flip is a probability'):
        DSAConfig(flip=1.5)
    with pytest.raises(TypeError, match='explicit torch.Generator'):
        dsa_draw(DSAConfig(), 4, 2, None)
    with pytest.raises(ValueError, match='spatial_dims must be 2 or 3'):
        dsa_draw(DSAConfig(), 4, 1, _gen(0))
    d = dsa_draw(DSAConfig('flip'), 4, 2, _gen(0))
    with pytest.raises(ValueError, match='the draw has parameters for 4 samples, x has 5'):
        dsa_apply(torch.zeros(5, 1, 8, 8), d)
    with pytest.raises(ValueError, match=r'a 3D draw needs x of shape \(N, C, D, H, W\)'):
        dsa_apply(torch.zeros(4, 8, 8), dsa_draw(DSAConfig('flip'), 4, 3, _gen(0)))
    with pytest.raises(ValueError, match=r'dsa: x must be \(N, C, H, W\)'):
        dsa(torch.zeros(8, 8), DSAConfig(), _gen(0))


def test_draw_spatial_shape_argument_and_device_move():
    a = dsa_draw(DSAConfig('scale'), 3, (28, 28, 28), _gen(1))
    b = dsa_draw(DSAConfig('scale'), 3, 3, _gen(1), device='cpu')
    assert a.spatial_dims == 3 and torch.equal(a.params['theta'], b.params['theta'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_same_augmentation_from_cpu_generator():
    x = torch.randn(4, 3, 16, 16, generator=_gen(0))
    for op in OPS:
        cpu = dsa(x, DSAConfig(op), _gen(3))
        gpu = dsa(x.cuda(), DSAConfig(op), _gen(3))
        assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    # a generator on the GPU: draws made there, reproducible, differentiable
    xg = x.cuda().requires_grad_(True)
    a = dsa(xg, DSAConfig(), torch.Generator('cuda').manual_seed(1))
    b = dsa(xg, DSAConfig(), torch.Generator('cuda').manual_seed(1))
    assert torch.equal(a, b)
    a.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    for op in OPS:
        d = dsa_draw(DSAConfig(op), 4, 3, torch.Generator('cuda').manual_seed(2))
        assert all(v.is_cuda for v in d.params.values())
        assert dsa_apply(torch.randn(4, 1, 8, 8, 8, device='cuda'), d).shape == (4, 1, 8, 8, 8)
