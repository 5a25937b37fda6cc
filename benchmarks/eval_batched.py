"""Speed of the batched evaluation: K nets trained as one stack against the same K nets trained one by one.

For BreastMNIST and the PathMNIST subset, at ipc 2 and 10 (random real images per class as the set), it times
`evaluate_synset` with `EvalProtocol(batched=False)` (engine 'func', one net at a time) and `batched=True` with
each batched engine ('stacked': the K nets as one grouped-convolution model; 'vmap': torch.func.vmap of torch.func.grad),
checks that they give the same nets, and breaks one training step down into augmentation, gradient and update.
The last line is

    RESULT speedup_ipc2=<x> speedup_ipc10=<y>

where speed-up = sequential seconds / batched seconds (the first engine of --engines, 'stacked' by default),
averaged (arithmetic mean) over the datasets. Times include building the nets and testing them on the test split
(the same work in both paths). Data root: env PTM_DATA_DIR, else ../shared/data/medmnist beside the repository.

    .venv/bin/python benchmarks/eval_batched.py [--epochs 10] [--K 10] [--engines stacked,vmap]

About 3 minutes on two quiet cores with the defaults; several times that when other jobs share the cores.
"""
import argparse, os, statistics, time
from pathlib import Path
import torch
from ptm_nb.augment import DSAConfig
from ptm_nb.data import load_dataset, real_per_class
from ptm_nb.nets import make_net, flat_params
from ptm_nb.engines import make_grad_fn, pick_engine
from ptm_nb.train import EvalProtocol, augment_stack, evaluate_synset, stream_generator


def data_root() -> Path:
    env = os.environ.get('PTM_DATA_DIR')
    return Path(env) if env else (Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data' / 'medmnist').resolve()


def timed(fn):
    t0 = time.perf_counter(); out = fn(); return out, time.perf_counter() - t0


def step_breakdown(x, y, n_classes, K, engine, reps=5):
    "Milliseconds per training step of K nets on one full batch: (augmentation, gradient, update)."
    nets = [make_net('convnet', tuple(x.shape[1:]), n_classes, stream_generator(0, 'net', k, 'init')) for k in range(K)]
    W = torch.stack([flat_params(n) for n in nets])
    X, Y = x.unsqueeze(0).expand(K, *x.shape).contiguous(), y.unsqueeze(0).expand(K, *y.shape)
    gens = [torch.Generator().manual_seed(k) for k in range(K)]
    V = torch.zeros_like(W)
    def sgd(w, v):                      # the update of fit_stack, a stand-in gradient, a tiny lr
        g = w.clone(); g.add_(w, alpha=5e-4); v.mul_(0.9).add_(g); w.add_(v, alpha=-1e-9)
    if engine == 'func':       # one net at a time, as the sequential path
        aug = lambda: [augment_stack(X[k:k + 1], DSAConfig(), gens[k:k + 1]) for k in range(K)]
        fns = [make_grad_fn(n, 'func') for n in nets]
        grad = lambda: [fns[k](W[k:k + 1], X[k:k + 1], Y[k:k + 1]) for k in range(K)]
        update = lambda: [sgd(W[k:k + 1], V[k:k + 1]) for k in range(K)]
    else:
        aug = lambda: augment_stack(X, DSAConfig(), gens)
        fn = make_grad_fn(nets[0], engine)
        grad = lambda: fn(W, X, Y)
        update = lambda: sgd(W, V)
    out = []
    for part in (aug, grad, update):
        part()
        t0 = time.perf_counter()
        for _ in range(reps): part()
        out.append(1e3 * (time.perf_counter() - t0) / reps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--epochs', type=int, default=10)
    ap.add_argument('--K', type=int, default=10)
    ap.add_argument('--ipcs', default='2,10')
    ap.add_argument('--datasets', default='breastmnist,pathmnist_subset1000')
    ap.add_argument('--engines', default='stacked', help="batched engines to time, e.g. stacked,vmap; the first is the RESULT's")
    ap.add_argument('--no-breakdown', action='store_true')
    args = ap.parse_args()
    ipcs, engines = [int(i) for i in args.ipcs.split(',')], args.engines.split(',')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, K={args.K}, epochs={args.epochs}, '
          f'ConvNet-3 width 128 (instance norm), DSA on, data {data_root()}', flush=True)
    make_net('convnet', (1, 28, 28), 2)                                      # one-time import costs, not timed
    speedups = {ipc: [] for ipc in ipcs}
    for name in args.datasets.split(','):
        ds = load_dataset(name, root=data_root(), download=False)
        for ipc in ipcs:
            x, y = real_per_class(ds.train_x, ds.train_y, ds.n_classes, ipc, stream_generator(0, 'bench', ipc))
            run = lambda batched, engine: evaluate_synset(
                x, y, ds.test_x, ds.test_y, EvalProtocol(epochs=args.epochs, K=args.K, batched=batched, engine=engine),
                keep_params=True)
            seq, t_seq = timed(lambda: run(False, 'func'))
            line = f'{name:22s} ipc {ipc:2d} ({len(x):3d} images): one by one {t_seq:7.1f} s'
            for i, eng in enumerate(engines):
                res, t = timed(lambda: run(True, eng))
                same_acc = max(abs(a - b) for a, b in zip(res.accs, seq.accs))
                dparam = (res.params - seq.params).abs().max().item()
                line += f' | {eng} {t:7.1f} s = {t_seq / t:4.2f}x (acc diff {same_acc:.1e}, max |dW| {dparam:.1e})'
                if i == 0: speedups[ipc].append(t_seq / t)
            auto = pick_engine(make_net('convnet', tuple(x.shape[1:]), ds.n_classes), True, 'cpu', min(256, len(x)))
            print(line, f"| {seq.summary()} | engine='auto' here: {auto}", flush=True)
            if not args.no_breakdown:
                parts = {e: step_breakdown(x, y, ds.n_classes, args.K, e) for e in ['func', *engines]}
                print('    one step of K nets, ms (augment / gradient / update): ' +
                      ', '.join(f"{e} {a:.0f} / {g:.0f} / {u:.1f}" for e, (a, g, u) in parts.items()), flush=True)
    print('speed-up = sequential s / batched s with engine', engines[0], '(arithmetic mean over',
          args.datasets.replace(',', ' and ') + ')')
    print('RESULT ' + ' '.join(f'speedup_ipc{ipc}={statistics.mean(v):.2f}' for ipc, v in speedups.items()))


if __name__ == '__main__':
    main()
