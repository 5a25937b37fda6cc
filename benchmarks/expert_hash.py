"""What checking an expert file by its sha256 costs, against reading the file.

`generate_experts` checks every expert file of a buffer against the sha256 that its `meta.json` recorded, at
every call (every run that needs experts); it used to take a file whose size and mtime were the recorded ones
as it was. This times, on one expert file of the shape a preset makes, `ptm_nb.io.file_digest` (sha256)
against reading the same file with `torch.load(weights_only=True)` (`ptm_nb.io.read_tensors` without its
digest check), both with the file in the page cache, as it is at every run after the first. The file is
written as `generate_experts` writes it: {'trajectory': (epochs + 1, P) float32, 'meta': {...}}, with P the
parameters of the preset's ConvNet on 3x28x28 images and 9 classes (pathmnist, the quick scale's dataset).
Each time is the median of --repeats.

    python benchmarks/expert_hash.py [--scale quick] [--repeats 7] [--threads 1]

The last line is
    RESULT sha256_s=<a> torch_load_s=<b> ratio=<a/b> mb=<file size in MB>
after a line with what the preset's whole buffer (n_experts files) costs to check.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import yaml

from ptm_nb.io import _tensors_from, atomic_write, file_digest
from ptm_nb.nets import flat_params, make_net

HPARAMS = Path(__file__).resolve().parents[1] / 'hparams.yaml'


def median_seconds(fn, repeats: int) -> float:
    "The median wall time of `fn()` over `repeats` calls, after one untimed call (it fills the page cache)."
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scale', default='quick', help='the preset whose net and expert epochs size the file')
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--threads', type=int, default=1, help='torch threads (the hash uses one)')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = yaml.safe_load(HPARAMS.read_text())['scales'][args.scale]
    epochs = scale['experts']['epochs']
    P = flat_params(make_net('convnet', (3, 28, 28), 9, torch.Generator().manual_seed(0),
                             **scale.get('net_options', {}))).numel()
    traj = torch.randn(epochs + 1, P, generator=torch.Generator().manual_seed(0))
    meta = {'index': 0, 'test_acc': [0.1] * (epochs + 1), 'train_loss': [1.0] * epochs, 'wall_s': 1.0}
    with tempfile.TemporaryDirectory() as d:
        save = lambda f: torch.save({'trajectory': traj, 'meta': meta}, f)
        path = atomic_write(Path(d) / 'expert_000.pt', save)
        mb = path.stat().st_size / 1e6
        hash_s = median_seconds(lambda: file_digest(path), args.repeats)
        load_s = median_seconds(lambda: _tensors_from(path)['trajectory'].sum(), args.repeats)
    print(f'{args.scale}: one expert of {epochs} epochs, P = {P:,} parameters, {mb:.1f} MB; '
          f'sha256 {hash_s * 1e3:.1f} ms ({mb / hash_s:.0f} MB/s), torch.load {load_s * 1e3:.1f} ms '
          f'(median of {args.repeats}, file in the page cache, {args.threads} torch thread(s))')
    n = scale['experts']['n_experts']
    print(f'its buffer of {n} experts: {n * hash_s:.2f} s of sha256 at each generate_experts')
    print(f'RESULT sha256_s={hash_s:.4f} torch_load_s={load_s:.4f} ratio={hash_s / load_s:.2f} mb={mb:.1f}')


if __name__ == '__main__':
    main()
