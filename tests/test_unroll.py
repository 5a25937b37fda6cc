"""ptm_nb.unroll: the three backward modes against each other and against finite differences, the recorded plan,
the positive step size, the matching loss with pruning, the non-finite guard, and bad input."""
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from ptm_nb.augment import DSAConfig
from ptm_nb.nets import flat_params, functional, make_net
from ptm_nb.unroll import (NonFiniteGuard, SynLR, UnrollConfig, UnrollPlan, matching_loss, plan_unroll,
                           step_batch, student_grad, unroll_student)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


def problem(seed=0, shape=(1, 8, 8), n_classes=3, ipc=2, width=8, depth=2, soft=False, device='cpu'):
    "A tiny float64 distillation problem: (fnet, theta_start, theta_target, images, labels)."
    g = torch.Generator().manual_seed(seed)
    net = make_net('convnet', shape, n_classes, generator=g, device=device, dtype=F64, width=width, depth=depth)
    fnet, theta_start = functional(net), flat_params(net)
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=g, dtype=F64).to(device)
    images = torch.randn(n_classes * ipc, *shape, generator=g, dtype=F64).to(device)
    labels = torch.arange(n_classes, device=device).repeat_interleave(ipc)
    if soft:
        labels = 2 * F.one_hot(labels, n_classes).to(F64) + 0.1 * torch.randn(len(labels), n_classes, generator=g,
                                                                               dtype=F64).to(device)
    return fnet, theta_start, theta_target, images, labels


def gradients(mode, prob, plan_seed=1, start_grad=False, **cfg_kw):
    "One matching-loss backward in `mode`; the loss, theta_N and the gradients of everything learnable."
    fnet, theta_start, theta_target, images, labels = prob
    cfg = UnrollConfig(backward=mode, **cfg_kw)
    base = images.clone().requires_grad_()
    x = base * 1.0  # a non-leaf, as when the images are generated (HaBa): the gradient must reach `base`
    y = labels.clone().requires_grad_() if cfg.soft_labels else labels
    start = theta_start.clone().requires_grad_(start_grad)
    syn_lr = SynLR.from_config(0.05, cfg, device=x.device, dtype=F64)
    plan = plan_unroll(len(x), cfg, torch.Generator().manual_seed(plan_seed), x.dim() - 2, x.device)
    theta_N = unroll_student(fnet, start, x, y, syn_lr(), cfg, plan=plan)
    loss = matching_loss(theta_N, theta_start, theta_target)
    loss.backward()
    grads = {'images': base.grad, 'syn_lr': syn_lr.raw.grad}
    if cfg.soft_labels: grads['labels'] = y.grad
    if start_grad: grads['theta_start'] = start.grad
    return loss.detach(), theta_N.detach(), grads


def rel_err(a, b): return float((a - b).norm() / b.norm())


def cosine(a, b): return float(F.cosine_similarity(a.flatten(), b.flatten(), 0))


@pytest.mark.parametrize('soft', [False, True])
def test_exact_backward_equals_naive_2d(soft):
    prob = problem(soft=soft)
    kw = dict(syn_steps=5, batch_syn=4, soft_labels=soft, soft_target='logits', dsa=DSAConfig())
    l_n, th_n, g_n = gradients('naive', prob, start_grad=True, **kw)
    l_e, th_e, g_e = gradients('exact', prob, start_grad=True, **kw)
    assert torch.allclose(th_n, th_e, rtol=1e-12, atol=0) and torch.allclose(l_n, l_e, rtol=1e-12, atol=0)  # same plan
    assert set(g_n) == set(g_e) == ({'images', 'syn_lr', 'theta_start'} | ({'labels'} if soft else set()))
    for k in g_n:
        assert g_n[k].abs().sum() > 0, k
        assert rel_err(g_e[k], g_n[k]) <= 1e-6, (k, rel_err(g_e[k], g_n[k]))


def test_exact_backward_equals_naive_3d_probs():
    prob = problem(shape=(1, 4, 6, 6), n_classes=2, depth=1, soft=True)
    fnet, theta_start, theta_target, images, labels = prob
    prob = (fnet, theta_start, theta_target, images, labels.softmax(-1))  # soft labels as probabilities
    kw = dict(syn_steps=4, batch_syn=None, soft_labels=True, soft_target='probs', dsa=DSAConfig())
    _, _, g_n = gradients('naive', prob, **kw)
    _, _, g_e = gradients('exact', prob, **kw)
    for k in g_n: assert rel_err(g_e[k], g_n[k]) <= 1e-6, k


def test_naive_gradient_matches_finite_differences():
    fnet, theta_start, theta_target, images, labels = problem(seed=3, shape=(1, 6, 6), n_classes=2, width=4,
                                                              depth=1, soft=True)
    cfg = UnrollConfig(syn_steps=3, backward='naive', soft_labels=True, soft_target='logits', dsa=DSAConfig())
    plan = plan_unroll(len(images), cfg, torch.Generator().manual_seed(5), 2)

    def L(x, y, lr):
        return matching_loss(unroll_student(fnet, theta_start, x, y, lr, cfg, plan=plan), theta_start, theta_target)

    x, y = images.clone().requires_grad_(), labels.clone().requires_grad_()
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    L(x, y, lr).backward()
    g = torch.Generator().manual_seed(7)
    vx, vy = torch.randn(images.shape, generator=g, dtype=F64), torch.randn(labels.shape, generator=g, dtype=F64)
    eps = 1e-6
    with torch.no_grad():
        fd = {'images': (L(images + eps * vx, labels, lr) - L(images - eps * vx, labels, lr)) / (2 * eps),
              'labels': (L(images, labels + eps * vy, lr) - L(images, labels - eps * vy, lr)) / (2 * eps),
              'syn_lr': (L(images, labels, lr + eps) - L(images, labels, lr - eps)) / (2 * eps)}
    analytic = {'images': (x.grad * vx).sum(), 'labels': (y.grad * vy).sum(), 'syn_lr': lr.grad}
    for k in fd:
        assert abs(float(analytic[k] - fd[k])) <= 1e-6 * abs(float(fd[k])) + 1e-10, (k, analytic[k], fd[k])


def test_tesla_is_exact_for_one_step_and_approximate_beyond():
    prob = problem(seed=2)
    kw = dict(batch_syn=3, dsa=DSAConfig())
    # one step: there are no later Hessian terms to drop, so TESLA's gradient is the exact one
    _, th_t, g_t = gradients('tesla', prob, syn_steps=1, **kw)
    _, th_e, g_e = gradients('exact', prob, syn_steps=1, **kw)
    assert torch.equal(th_t, th_e)
    for k in g_e: assert rel_err(g_t[k], g_e[k]) <= 1e-10, k
    # six steps: it drops them; the gradient differs but points the same way
    _, th_t, g_t = gradients('tesla', prob, syn_steps=6, **kw)
    _, th_e, g_e = gradients('exact', prob, syn_steps=6, **kw)
    assert torch.equal(th_t, th_e)  # the forward pass is the same unroll
    assert rel_err(g_t['images'], g_e['images']) > 1e-8
    for k in g_e: assert cosine(g_t[k], g_e[k]) > 0.5, (k, cosine(g_t[k], g_e[k]))


def test_plan_is_reproducible_and_each_step_recomputable():
    fnet, theta_start, _, images, labels = problem()
    cfg = UnrollConfig(syn_steps=4, batch_syn=4, backward='exact', dsa=DSAConfig())
    lr = torch.tensor(0.05, dtype=F64)
    a = unroll_student(fnet, theta_start, images, labels, lr, cfg, torch.Generator().manual_seed(11))
    b = unroll_student(fnet, theta_start, images, labels, lr, cfg, torch.Generator().manual_seed(11))
    c = unroll_student(fnet, theta_start, images, labels, lr, cfg, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    plan = plan_unroll(len(images), cfg, torch.Generator().manual_seed(11), 2)
    assert len(plan) == 4 and len(plan.draws) == 4
    w = theta_start
    for i in range(len(plan)):  # recompute every step by hand from the recorded indices and draws
        x, y = step_batch(images, labels, plan, i)
        w = w - lr * student_grad(fnet, w.detach().requires_grad_(), x, y, cfg)
    assert torch.equal(w.detach(), a)


def test_exact_mode_keeps_no_graph_that_grows_with_steps():
    "What the result's graph keeps alive: naive grows with N, exact holds only its inputs (plus N weight vectors)."
    fnet, theta_start, theta_target, images, labels = problem(width=4, depth=1)

    def kept_bytes(mode, steps):
        alive = []

        def pack(t):
            alive.append(weakref.ref(t))
            return t
        x = images.clone().requires_grad_()
        cfg = UnrollConfig(syn_steps=steps, backward=mode, dsa=DSAConfig())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            theta_N = unroll_student(fnet, theta_start, x, labels, torch.tensor(0.05, dtype=F64), cfg,
                                     torch.Generator().manual_seed(0))
        seen, total = set(), 0
        for r in alive:
            t = r()
            if t is not None and id(t) not in seen:
                seen.add(id(t)); total += t.numel() * t.element_size()
        stored = sum(w.numel() * w.element_size() for w in (theta_N.grad_fn.weights or [])) if mode == 'exact' else 0
        return total, stored, theta_N

    n2, _, _ = kept_bytes('naive', 2)
    n8, _, _ = kept_bytes('naive', 8)
    e2, s2, _ = kept_bytes('exact', 2)
    e8, s8, theta_N = kept_bytes('exact', 8)
    assert n8 > 3 * n2                      # the naive graph grows linearly in N
    assert e2 == e8                         # the exact graph does not grow at all
    assert s8 == 8 * theta_N.numel() * 8    # only the weight vectors theta_0..theta_7 are stored


def test_distillation_reduces_matching_loss():
    "Learning the images pulls theta_N towards a target that some other image set reaches."
    fnet, theta_start, _, images, labels = problem(seed=5)
    cfg = UnrollConfig(syn_steps=3, backward='exact', dsa=None)
    other = torch.randn(images.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    theta_target = unroll_student(fnet, theta_start, other, labels, 0.05, cfg, torch.Generator().manual_seed(0))
    x = images.clone().requires_grad_()
    syn_lr = SynLR.from_config(0.05, cfg, dtype=F64)
    opt = torch.optim.SGD([x], lr=100.0, momentum=0.5)
    losses = []
    for it in range(10):
        loss = matching_loss(unroll_student(fnet, theta_start, x, labels, syn_lr(), cfg,
                                            torch.Generator().manual_seed(0)), theta_start, theta_target.detach())
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_guard_skips_non_finite_update_and_counts_it():
    fnet, theta_start, theta_target, images, labels = problem(seed=4)
    cfg = UnrollConfig(syn_steps=3, backward='exact', lr_param='exp')
    x = images.clone().requires_grad_()
    guard = NonFiniteGuard()
    for step, lr0 in enumerate([1e30, 0.05]):  # a huge step size blows the student up; a sane one does not
        syn_lr = SynLR.from_config(lr0, cfg, dtype=F64)
        opts = [torch.optim.SGD([x], lr=100, momentum=0.5), torch.optim.SGD(syn_lr.parameters(), lr=1e-5)]
        before = x.detach().clone()
        loss = matching_loss(unroll_student(fnet, theta_start, x, labels, syn_lr(), cfg,
                                            torch.Generator().manual_seed(0)), theta_start, theta_target)
        loss.backward()
        made = guard.step(loss, opts, step=step, images=x, syn_lr=syn_lr)
        assert x.grad is None and syn_lr.raw.grad is None          # cleared either way
        if step == 0:
            assert not made and torch.equal(x.detach(), before)    # the images never see the non-finite values
            assert guard.events[0]['step'] == 0 and 'images' in guard.events[0]['non_finite']
        else:
            assert made and not torch.equal(x.detach(), before) and torch.isfinite(x).all()
    assert (guard.checked, guard.skipped) == (2, 1)
    assert not guard.check(torch.tensor(float('nan')))            # a non-finite loss alone is enough
    assert guard.check(torch.tensor(1.0), g=None, h=torch.ones(3))


@pytest.mark.parametrize('param', ['softplus', 'exp', 'clamp'])
def test_syn_lr_stays_positive_and_raw_lr_for_matches_a_plain_step(param):
    lr = SynLR(0.01, param, lr_min=1e-6, dtype=F64)
    # MTT's step on syn_lr itself: syn_lr - lr_lr * g; the converted step on raw moves syn_lr the same (first order)
    g, lr_lr = 3.0, 1e-5
    opt = torch.optim.SGD(lr.parameters(), lr=lr.raw_lr_for(lr_lr))
    v = lr(); (v * g).backward(); opt.step()
    assert math.isclose(lr.item() - 0.01, -lr_lr * g, rel_tol=0.01), lr.item()  # the change, to first order
    # a gradient that keeps pushing the step size down (the lr_lr = 1e-5 divergence) never makes it <= 0
    opt = torch.optim.SGD(lr.parameters(), lr=1.0, momentum=0.5)
    for _ in range(200):
        opt.zero_grad(); (lr() * 50.0).backward(); opt.step()
        assert lr.item() >= 1e-6 and math.isfinite(lr.item())


def test_matching_loss_pruning_and_mask():
    g = torch.Generator().manual_seed(0)
    th_N, th_s, th_t = (torch.randn(100, generator=g, dtype=F64) for _ in range(3))
    th_N.requires_grad_()
    num, den = (th_N.detach() - th_t) ** 2, (th_s - th_t) ** 2
    drop = num.argsort(descending=True)[:10]
    keep = torch.ones(100, dtype=torch.bool); keep[drop] = False
    loss = matching_loss(th_N, th_s, th_t, prune_fraction=0.1)
    assert torch.isclose(loss, num[keep].sum() / den[keep].sum())
    loss.backward()
    assert (th_N.grad[drop] == 0).all() and (th_N.grad[keep] != 0).all()  # pruned elements get no gradient
    mask = torch.arange(100) % 2 == 0
    assert torch.isclose(matching_loss(th_N, th_s, th_t, mask=mask), num[mask].sum() / den[mask].sum())
    # prune within the mask: 10 % of the 50 kept elements
    both = matching_loss(th_N, th_s, th_t, mask=mask, prune_fraction=0.1)
    score = num.masked_fill(~mask, -1)
    keep2 = mask.clone(); keep2[score.argsort(descending=True)[:5]] = False
    assert torch.isclose(both, num[keep2].sum() / den[keep2].sum())


def test_matching_loss_bad_input():
    v = torch.ones(5)
    with pytest.raises(ValueError, match='prune_fraction'): matching_loss(v, v * 2, v * 3, prune_fraction=1.0)
    with pytest.raises(ValueError, match='bool'): matching_loss(v, v * 2, v * 3, mask=torch.ones(5))
    with pytest.raises(ValueError, match='flat vectors'): matching_loss(v, v * 2, torch.ones(4))
    with pytest.raises(ValueError, match='target epoch'): matching_loss(v, v * 3, v * 3)


def test_unroll_bad_input_is_reported():
    fnet, theta_start, _, images, labels = problem()
    cfg = UnrollConfig(syn_steps=2)
    gen = lambda: torch.Generator().manual_seed(0)
    cases = [
        (dict(labels=labels.double()), 'hard labels must be int64'),
        (dict(labels=labels[:-1]), 'one label per image'),
        (dict(syn_lr=-0.1), 'positive and finite'),
        (dict(syn_lr=float('nan')), 'positive and finite'),
        (dict(images=images.float()), 'one float dtype'),
        (dict(images=images[:, 0]), r'\(n, C, H, W\)'),
        (dict(theta_start=theta_start[None]), 'flat parameter vector'),
        (dict(generator=None), 'torch.Generator'),
        (dict(cfg=UnrollConfig(syn_steps=2, soft_labels=True)), 'soft_labels=True needs float labels'),
        (dict(plan=plan_unroll(len(images), UnrollConfig(syn_steps=3), gen(), 2)), 'cfg.syn_steps=2'),
        (dict(plan=plan_unroll(len(images), UnrollConfig(syn_steps=2, dsa=None), gen(), 2)), 'augmentation'),
    ]
    for override, message in cases:
        kw = dict(fnet=fnet, theta_start=theta_start, images=images, labels=labels, syn_lr=0.05, cfg=cfg,
                  generator=gen())
        kw.update(override)
        with pytest.raises(ValueError, match=message): unroll_student(**kw)
    with pytest.raises(TypeError, match='torch.Generator'): plan_unroll(4, cfg, 0)
    x = images.clone().requires_grad_()
    theta_N = unroll_student(fnet, theta_start, x, labels, 0.05, UnrollConfig(syn_steps=2), gen())
    theta_N.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='backwards twice'): theta_N.sum().backward()
    with pytest.raises(ValueError, match='soft_target'): UnrollConfig(soft_target='onehot')
    with pytest.raises(ValueError, match='init_lr'): SynLR(-1.0)
    with pytest.raises(ValueError, match='parameterisation'): SynLR(0.1, 'sigmoid')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_exact_equals_naive_and_cpu():
    kw = dict(syn_steps=4, batch_syn=4, soft_labels=True, soft_target='logits', dsa=DSAConfig())
    _, th_n, g_n = gradients('naive', problem(soft=True, device='cuda'), **kw)
    _, th_e, g_e = gradients('exact', problem(soft=True, device='cuda'), **kw)
    _, th_c, g_c = gradients('exact', problem(soft=True), **kw)
    assert th_e.device.type == 'cuda' and g_e['images'].device.type == 'cuda'
    for k in g_n:
        assert rel_err(g_e[k], g_n[k]) <= 1e-6, k
        assert rel_err(g_e[k].cpu(), g_c[k]) <= 1e-6, k   # the same plan on CPU and CUDA
