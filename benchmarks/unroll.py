"""Memory and time of the student unroll: naive backward (the whole N-step graph) against the exact
memory-efficient backward (per-step checkpointing), for N in {10, 20, 40, 80} and ipc in {2, 10}.

Setting: ConvNet-3, width 128, instance norm, 9 classes, random 3x28x28 images, batch_syn = all images,
DSA on, float32, one matching-loss backward per iteration (as one distillation iteration without the image update).

Each (mode, N, ipc) runs in a fresh subprocess. Peak memory on CPU = the process's ru_maxrss at the end minus
ru_maxrss after setup (imports, network, images), i.e. the extra resident memory the iterations needed; on CUDA
= torch.cuda.max_memory_allocated minus the memory allocated after setup (after one warm-up step).
Seconds per iteration = the mean over --iters timed iterations.
Naive runs are skipped where their memory, extrapolated linearly in N from the smallest N measured at that ipc,
would exceed --naive-max-gb (default 12 GB on CPU, where the machine is shared, and half the GPU memory on
CUDA), and always at N=80, ipc 10 on CPU.

The last line is
    RESULT mem_ratio_80_10=<x> time_ratio=<y> grad_rel_err=<z>
x: exact-mode peak memory at N=80 over its peak at N=10 (ipc 10); y: exact-mode seconds per iteration over
naive's at N=40, ipc 10; z: float64 relative error of the exact gradient against the naive one (images and
syn_lr, the larger), on a small ConvNet with DSA on and the same recorded draws.

    python benchmarks/unroll.py [--device cuda] [--iters 2] [--steps 10 20 40 80] [--ipcs 10 2] [--threads 1]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from ptm_nb.augment import DSAConfig
from ptm_nb.nets import flat_params, functional, make_net
from ptm_nb.unroll import SynLR, UnrollConfig, matching_loss, plan_unroll, unroll_student

N_CLASSES, SHAPE = 9, (3, 28, 28)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def worker(mode: str, steps: int, ipc: int, device: str, iters: int, threads: int = 0) -> dict:
    "One configuration: setup, then `iters` timed iterations; returns peak extra memory (MB) and s/iteration."
    if threads > 0: torch.set_num_threads(threads)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    net = make_net('convnet', SHAPE, N_CLASSES, generator=g, device=dev, width=128, depth=3, norm='instance')
    fnet, theta_start = functional(net), flat_params(net)
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=g).to(dev)
    images = torch.randn(N_CLASSES * ipc, *SHAPE, generator=g).to(dev).requires_grad_()
    labels = torch.arange(N_CLASSES, device=dev).repeat_interleave(ipc)
    cfg = UnrollConfig(syn_steps=steps, batch_syn=None, backward=mode, dsa=DSAConfig())
    syn_lr = SynLR.from_config(0.01, cfg, device=dev)
    plan_gen = torch.Generator().manual_seed(1)

    def iteration(c):
        theta_N = unroll_student(fnet, theta_start, images, labels, syn_lr(), c, plan_gen)
        loss = matching_loss(theta_N, theta_start, theta_target)
        loss.backward()
        images.grad = syn_lr.raw.grad = None
        return float(loss.detach())

    if dev.type == 'cuda':
        iteration(UnrollConfig(syn_steps=1, backward=mode))  # warm-up: kernels, cuDNN, allocator
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = rss_mb()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        iteration(cfg)
        if dev.type == 'cuda': torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == 'cuda' else rss_mb() - base)
    return {'peak_mb': peak, 's_per_it': sum(times) / len(times), 'times': times,
            'n_params': theta_start.numel()}


def run_config(mode, steps, ipc, args) -> dict:
    cmd = [sys.executable, __file__, '--worker', mode, str(steps), str(ipc), '--device', args.device,
           '--iters', str(args.iters), '--threads', str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'worker {mode} N={steps} ipc={ipc} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def grad_rel_err(device: str) -> float:
    "Float64 exact-vs-naive relative gradient error on a small ConvNet, DSA on, same recorded draws."
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    net = make_net('convnet', (1, 12, 12), 3, generator=g, device=dev, dtype=torch.float64, width=8, depth=2)
    fnet, theta_start = functional(net), flat_params(net)
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=g, dtype=torch.float64).to(dev)
    images = torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64).to(dev)
    labels = torch.arange(3, device=dev).repeat_interleave(2)
    grads = {}
    for mode in ('naive', 'exact'):
        cfg = UnrollConfig(syn_steps=5, batch_syn=4, backward=mode, dsa=DSAConfig())
        plan = plan_unroll(len(images), cfg, torch.Generator().manual_seed(1), 2, dev)
        x = images.clone().requires_grad_()
        syn_lr = SynLR.from_config(0.05, cfg, device=dev, dtype=torch.float64)
        matching_loss(unroll_student(fnet, theta_start, x, labels, syn_lr(), cfg, plan=plan),
                      theta_start, theta_target).backward()
        grads[mode] = (x.grad, syn_lr.raw.grad)
    return max(float((e - n).norm() / n.norm()) for e, n in zip(grads['exact'], grads['naive']))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--iters', type=int, default=2, help='timed iterations per configuration')
    ap.add_argument('--steps', type=int, nargs='+', default=[10, 20, 40, 80])
    ap.add_argument('--ipcs', type=int, nargs='+', default=[10, 2], help='ipc 10 first: the RESULT line needs it')
    ap.add_argument('--naive-max-gb', type=float, default=None,
                    help='skip a naive run whose extrapolated memory exceeds this (default: 12 on CPU, '
                         'half the GPU memory on CUDA)')
    ap.add_argument('--threads', type=int, default=0,
                    help="torch CPU threads per worker (0: torch's default); on a busy machine 1 can be faster")
    ap.add_argument('--worker', nargs=3, metavar=('MODE', 'N', 'IPC'), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, steps, ipc = args.worker
        print(json.dumps(worker(mode, int(steps), int(ipc), args.device, args.iters, args.threads)))
        return
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit('--device cuda: no CUDA device is visible to torch')
    if args.naive_max_gb is None:
        args.naive_max_gb = (torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**31
                             if args.device.startswith('cuda') else 12.0)
    if args.threads > 0: torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    unit = 'MB allocated' if args.device.startswith('cuda') else 'MB RSS'
    print(f'device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, '
          f'{args.iters} timed iterations per configuration; ConvNet-3 w128 instance norm, 9 classes, 3x28x28, '
          f'batch_syn = all images, DSA on, float32', flush=True)
    print(f'{"ipc":>4} {"N":>4} {"mode":>6} {"peak " + unit:>16} {"s/iter":>8}', flush=True)
    res = {}
    for ipc in args.ipcs:
        naive_per_step = None
        for steps in sorted(args.steps):
            for mode in ('naive', 'exact'):
                skip = None
                if mode == 'naive':
                    if not args.device.startswith('cuda') and ipc >= 10 and steps >= 80:
                        skip = 'naive at N=80, ipc 10 would need ~2x the 9.3 GB measured at N=40 (ENV.md): skipped'
                    elif naive_per_step is not None and naive_per_step * steps / 1024 > args.naive_max_gb:
                        skip = (f'naive would need ~{naive_per_step * steps / 1024:.1f} GB (linear in N) > '
                                f'--naive-max-gb {args.naive_max_gb:.0f}: skipped')
                if skip:
                    print(f'{ipc:>4} {steps:>4} {mode:>6} {"-":>16} {"-":>8}  {skip}', flush=True)
                    continue
                r = run_config(mode, steps, ipc, args)
                res[mode, steps, ipc] = r
                if mode == 'naive' and naive_per_step is None: naive_per_step = r['peak_mb'] / steps
                times = ' '.join(f'{t:.2f}' for t in r['times'])
                print(f'{ipc:>4} {steps:>4} {mode:>6} {r["peak_mb"]:>16.0f} {r["s_per_it"]:>8.2f}  ({times})',
                      flush=True)
    z = grad_rel_err(args.device)
    print(f'float64 exact vs naive gradient relative error (ConvNet w8 d2, 1x12x12, 3 classes, N=5, DSA): {z:.2e}')
    print(f'total {time.perf_counter() - t_start:.0f} s')

    def ratio(a, b):
        return f'{a / b:.3f}' if a is not None and b else 'nan'
    get = lambda mode, n, ipc, k: res[mode, n, ipc][k] if (mode, n, ipc) in res else None
    x = ratio(get('exact', 80, 10, 'peak_mb'), get('exact', 10, 10, 'peak_mb'))
    y = ratio(get('exact', 40, 10, 's_per_it'), get('naive', 40, 10, 's_per_it'))
    print(f'RESULT mem_ratio_80_10={x} time_ratio={y} grad_rel_err={z:.3e}')


if __name__ == '__main__':
    main()
