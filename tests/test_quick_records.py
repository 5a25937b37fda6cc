"""The quick-scale records committed under outputs/quick read back as they are: a clone renders the quick tables
without training or evaluating anything, and the committed tables agree with the records they were made from."""
import shutil
from pathlib import Path
import pandas as pd
import pytest
import ptm_nb.grid, ptm_nb.runs, ptm_nb.report
from ptm_nb.report import Paper, results_grid, over_seeds, paired_differences, seeds_for, REPO

QUICK = REPO / 'outputs' / 'quick'


def _no_work(*a, **k): raise AssertionError('a committed quick record was recomputed')


@pytest.fixture
def quick_copy(tmp_path, data_dir, monkeypatch):
    if not (QUICK / 'tables' / 'table2_mnist.csv').exists(): pytest.skip('no quick records committed yet')
    shutil.copytree(QUICK, tmp_path / 'quick', ignore=shutil.ignore_patterns('experts', 'notebooks'))
    monkeypatch.setenv('PTM_DATA_DIR', str(data_dir))
    real_run_grid = ptm_nb.grid.run_grid
    def guarded(tasks, *a, **k):
        if tasks: raise AssertionError(f'committed records missing, would compute: {list(tasks)[:3]}')
        return real_run_grid(tasks, *a, **k)
    monkeypatch.setattr(ptm_nb.grid, 'run_grid', guarded)
    for mod, name in ((ptm_nb.runs, 'evaluate_synset'), (ptm_nb.runs, 'full_data_baseline')):
        monkeypatch.setattr(mod, name, _no_work)
    return tmp_path


@pytest.mark.parametrize('notebook, table', [('table2_mnist', 'table2'), ('table3_highres', 'table3')])
def test_quick_seeded_tables_read_back_and_match_the_committed_ones(quick_copy, notebook, table):
    if not (QUICK / 'tables' / f'{notebook}.csv').exists(): pytest.skip(f'no quick {notebook} committed yet')
    paper = Paper(notebook, scale='quick', out=quick_copy, device='cpu')
    p = paper.nb_preset
    long = results_grid(paper, table, p['datasets'], p['ipcs'], paper.methods(p.get('methods')),
                        seeds=p.get('seeds'))
    committed = pd.read_csv(QUICK / 'tables' / f'{notebook}.csv')
    key = ['method', 'used', 'ipc', 'seed']
    a = long[long.seed.notna()].set_index(key).acc_mean.sort_index()
    b = committed[committed.seed.notna()].set_index(key).acc_mean.sort_index()
    assert a.index.equals(b.index) and (a - b).abs().max() < 1e-12
    cells = over_seeds(long).dropna(subset=['n_seeds'])
    for r in cells.itertuples():                                          # each cell has the seeds its preset names
        name = next(m for m in paper.methods(p.get('methods')) if ptm_nb.report.method_title(m) == r.method)
        dataset = next(c.paper_name for c in paper.choices if c.used_name == r.used)
        assert r.n_seeds == len(seeds_for(p.get('seeds') or [0], r.ipc, name, dataset))
    assert len(paired_differences(long)) > 0
