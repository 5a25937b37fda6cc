"""Speed of the task graph: one grid of runs that share expert buffers, from empty outputs, computed twice: once in
one process, one task after another (as a notebook alone computes its runs; torch's default threads), and once on
the embedded Dask LocalCluster (`ptm_nb.grid`, one single-threaded worker process per core). It checks that both
give the same run ids and the same synthetic sets, and prints

    RESULT speedup_2workers=<x> max_abs_diff=<d>

where speed-up = sequential seconds / cluster seconds. With different thread counts the sets agree to float
rounding (the last digits of a sum depend on how it is split among threads): `max_abs_diff` says by how much.
Bit-identical results at equal thread counts are checked by tests/test_grid.py.

The default grid is smoke Table 2's: PathMNIST's and ORGAN3D's stand-ins × random, DM, MTT, PTM × seeds 0-1
(16 runs, 2 expert buffers). Data root: env PTM_DATA_DIR, else ../shared/data/medmnist beside the repository.

    .venv/bin/python benchmarks/grid.py [--scale smoke] [--seeds 0,1] [--workers 2] [--set KEY=VALUE ...]

`--set` overrides every run's hyper-parameters as `ptm-nb distill --set` does, e.g. a grid of quick-sized nets with
short runs: `--scale quick --set experts.n_experts=2 --set experts.epochs=2 --set iterations=10
--set eval.nets=2 --set eval.epochs=30`.
"""
import argparse, os, tempfile, time
from pathlib import Path
import torch
from ptm_nb.runs import RunSpec, run_id, check_overrides
from ptm_nb.grid import plan, run_grid
from ptm_nb.distill import SyntheticSet
from ptm_nb.cli import _parse_sets


def knobs_of(method, dataset, a, overrides) -> dict:
    "The overrides that are knobs of `method` (random trains no experts; DM has no syn_steps)."
    cfg = RunSpec(method, dataset, a.ipc, a.scale, 0, device='cpu').resolve()
    def fits(k, v):
        try: check_overrides(cfg, {k: v}); return True
        except ValueError: return False
    return {k: v for k, v in overrides.items() if fits(k, v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scale', default='smoke')
    ap.add_argument('--datasets', default='pathmnist_subset1000,adrenalmnist3d')
    ap.add_argument('--methods', default='random,dm,mtt,ptm')
    ap.add_argument('--seeds', default='0,1')
    ap.add_argument('--ipc', type=int, default=2)
    ap.add_argument('--workers', type=int, default=os.cpu_count())
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args()
    if not os.environ.get('PTM_DATA_DIR'):
        os.environ['PTM_DATA_DIR'] = str(Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'medmnist')
    overrides = _parse_sets(a.set)
    specs = [RunSpec(m, d, a.ipc, a.scale, int(s), device='cpu', overrides=knobs_of(m, d, a, overrides))
             for d in a.datasets.split(',') for s in a.seeds.split(',') for m in a.methods.split(',')]
    seconds, roots = {}, {}
    for name, workers, threads in (('sequential', 0, None), (f'{a.workers} workers', a.workers, 1)):
        roots[name] = Path(tempfile.mkdtemp(prefix='grid-bench-'))
        tasks = plan(specs, roots[name])
        t0 = time.perf_counter()
        out = run_grid(tasks, roots[name], workers=workers, threads=threads, progress=True)
        seconds[name] = time.perf_counter() - t0
        out.raise_failures()
        print(f'{name}: {len(tasks)} tasks ({sum(t.kind == "experts" for t in tasks.values())} expert buffers) '
              f'in {seconds[name]:.1f} s')
    diff = 0.0
    for s in specs:
        rid = run_id(s.resolve())
        x, y = (SyntheticSet.load(r / 'runs' / rid / 'synset.pt').images for r in roots.values())
        diff = max(diff, float((x - y).abs().max()))
    seq, par = seconds.values()
    print(f'RESULT speedup_{a.workers}workers={seq / par:.2f} max_abs_diff={diff:.2e}')


if __name__ == '__main__':
    main()
