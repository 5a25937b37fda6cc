"""The paper reproduction: `ptm-nb reproduce` runs notebooks through papermill, writes tables, figures and the index,
skips what is finished, completes after a kill, and names a failing notebook."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / 'ptm-nb')]       # the console script of this environment


def _env(data_dir):
    return {**os.environ, 'PTM_DATA_DIR': str(data_dir), 'OMP_NUM_THREADS': '1'}


def _reproduce(out, data_dir, *args, timeout=600):
    return subprocess.run([*CLI, 'reproduce', '--scale', 'smoke', '--out', str(out), '--no-progress', *args],
                          env=_env(data_dir), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_reproduce_writes_skips_and_resumes(tmp_path, data_dir):
    out = tmp_path / 'out'
    # 1. start the batch and kill it once its second notebook has begun distilling
    p = subprocess.Popen([*CLI, 'reproduce', '--scale', 'smoke', '--out', str(out), '--no-progress',
                          '--only', 'table1,fig4'], env=_env(data_dir), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    runs, t0 = out / 'smoke' / 'runs', time.time()
    while time.time() - t0 < 300 and p.poll() is None and not any(runs.glob('*/metrics.jsonl')):
        time.sleep(0.2)
    killed = p.poll() is None
    if killed: os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    nb = out / 'smoke' / 'notebooks'
    if killed: assert not (nb / 'fig4_stability.ipynb').exists()     # interrupted: not marked finished
    # 2. started again, it completes: every table, figure and the index
    r = _reproduce(out, data_dir, '--only', 'table1,fig4')
    assert r.returncode == 0, r.stdout + r.stderr
    files = {p.relative_to(out / 'smoke').as_posix() for p in (out / 'smoke').rglob('*') if p.is_file()}
    for f in ['tables/table1_datasets.csv', 'tables/table1_datasets.md', 'figures/fig4_stability.png',
              'figures/fig4_stability.pdf', 'tables/fig4_stability_summary.md', 'notebooks/fig4_stability.ipynb',
              'notebooks/table1_datasets.ipynb', 'README.md']:
        assert f in files, (f, sorted(files))
    index = (out / 'smoke' / 'README.md').read_text()
    assert 'PathMNIST ← pathmnist_subset1000 (stand-in)' in index and '![fig4_stability](figures/fig4_stability.png)' in index
    assert 'breastmnist' in (out / 'smoke' / 'tables' / 'table1_datasets.md').read_text()
    # 3. a second time: nothing is recomputed
    before = {p: p.stat().st_mtime_ns for p in (out / 'smoke').rglob('*') if p.is_file() and p.name != 'README.md'}
    t0 = time.time(); r = _reproduce(out, data_dir, '--only', 'table1,fig4')
    assert r.returncode == 0 and '0 notebook(s) run, 2 skipped' in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert time.time() - t0 < 60
    # 4. a run the figure read is removed: the figure is out of date, so it runs again and the run is re-made
    record = json.loads((nb / 'fig4_stability.json').read_text())
    run_dirs = sorted({Path(f).parent for f in record['inputs'] if f.startswith('runs/')})
    assert run_dirs, record['inputs']
    gone = out / 'smoke' / run_dirs[0]
    import shutil; shutil.rmtree(gone)
    r = _reproduce(out, data_dir, '--only', 'table1,fig4')
    assert r.returncode == 0 and '1 notebook(s) run, 1 skipped' in r.stdout, r.stdout + r.stderr
    assert 'fig4_stability: 2 result file(s) it read changed' in r.stdout and (gone / 'eval.json').exists()


def test_reproduce_names_the_failing_notebook(tmp_path, data_dir):
    # a data root without any dataset: the notebook starts and fails inside its kernel
    (tmp_path / 'empty').mkdir()
    r = _reproduce(tmp_path / 'out', tmp_path / 'empty', '--only', 'table4')
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'table4_cross_arch' in r.stderr
    assert (tmp_path / 'out' / 'smoke' / 'notebooks' / 'table4_cross_arch.failed.ipynb').exists()


def test_reproduce_rejects_unknown_notebook(tmp_path, data_dir):
    r = _reproduce(tmp_path / 'out', data_dir, '--only', 'table9')
    assert r.returncode == 2 and 'no such paper notebook' in r.stderr


def test_reproduce_rejects_unknown_method_and_bad_ipcs(tmp_path, data_dir):
    r = _reproduce(tmp_path / 'out', data_dir, '--only', 'table2', '--methods', 'ptm,tpm')
    assert r.returncode == 2 and 'tpm' in r.stderr and 'registered' in r.stderr
    r = _reproduce(tmp_path / 'out', data_dir, '--only', 'table2', '--ipcs', '2,ten')
    assert r.returncode == 2 and '--ipcs' in r.stderr
    assert not (tmp_path / 'out' / 'smoke' / 'notebooks' / 'table2_mnist.ipynb').exists()


def test_reproduce_removes_the_failed_copy_once_the_notebook_runs(tmp_path, data_dir):
    failed = tmp_path / 'out' / 'smoke' / 'notebooks' / 'table1_datasets.failed.ipynb'
    (tmp_path / 'empty').mkdir()
    r = _reproduce(tmp_path / 'out', tmp_path / 'empty', '--only', 'table1')
    assert r.returncode == 1 and failed.exists(), r.stdout + r.stderr
    r = _reproduce(tmp_path / 'out', data_dir, '--only', 'table1')
    assert r.returncode == 0 and not failed.exists(), r.stdout + r.stderr
    assert (tmp_path / 'out' / 'smoke' / 'notebooks' / 'table1_datasets.ipynb').exists()


def test_moved_computations_find_the_committed_records(tmp_path, data_dir, monkeypatch):
    """`Paper.full_data` is computed in `ptm_nb.runs` now (`evaluate_full_data`): the quick full-data record
    committed before the move is found under the same name and read as it is, nothing trained."""
    import shutil
    import ptm_nb.runs
    from ptm_nb.report import Paper
    committed = sorted((REPO / 'outputs' / 'quick' / 'full_data').glob('pathmnist_subset1000-convnet-*.json'))
    if not committed: pytest.skip('no quick full-data record committed')
    shutil.copytree(committed[0].parent, tmp_path / 'quick' / 'full_data')
    def no_work(*a, **k): raise AssertionError('the committed full-data record was not found')
    monkeypatch.setattr(ptm_nb.runs, 'full_data_baseline', no_work)
    paper = Paper('table2_mnist', scale='quick', out=tmp_path, device='cpu')
    choice = paper.dataset('pathmnist')
    if choice is None: pytest.skip('pathmnist and its stand-in pathmnist_subset1000 are absent')
    assert paper.full_data(choice) == json.loads(committed[0].read_text())
    assert list(paper.inputs) == [f'full_data/{committed[0].name}']              # recorded as an input


def test_a_changed_preset_runs_the_notebook_again(tmp_path, data_dir):
    "A notebook is skipped only when its source, its parameters and the hyper-parameter table are all unchanged."
    import yaml
    out = tmp_path / 'out'
    assert _reproduce(out, data_dir, '--only', 'table1').returncode == 0
    r = _reproduce(out, data_dir, '--only', 'table1')
    assert '1 skipped' in r.stdout, r.stdout + r.stderr
    table = yaml.safe_load((REPO / 'hparams.yaml').read_text())
    table['paper']['presets']['smoke']['full_data']['nets'] += 1            # a preset value, nothing else
    changed = tmp_path / 'hparams.yaml'
    changed.write_text(yaml.safe_dump(table))
    r = subprocess.run([*CLI, 'reproduce', '--scale', 'smoke', '--out', str(out), '--no-progress', '--only', 'table1'],
                       env={**_env(data_dir), 'PTM_HPARAMS': str(changed)}, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0 and '1 notebook(s) run, 0 skipped' in r.stdout, r.stdout + r.stderr


def test_the_hparams_digest_reads_keys_of_mixed_kinds(tmp_path, monkeypatch):
    "Seeds by method and by ipc (`{default: [0, 1, 2], 10: {ptm: [0]}}`) mix text and number keys in one mapping."
    import hashlib, yaml
    from ptm_nb.report import hparams_digest
    table = yaml.safe_load((REPO / 'hparams.yaml').read_text())
    table['paper']['presets']['quick']['notebooks']['table2_mnist']['seeds'] = {'default': [0, 1, 2], 10: {'ptm': [0]}}
    path = tmp_path / 'hparams.yaml'
    path.write_text(yaml.safe_dump(table))
    monkeypatch.setenv('PTM_HPARAMS', str(path))
    digest = hparams_digest()
    as_json = lambda o: ({str(k): as_json(v) for k, v in o.items()} if isinstance(o, dict)      # JSON's keys
                         else [as_json(v) for v in o] if isinstance(o, list) else o)
    # as JSON writes it (number keys as text, in every mapping): the same table, the same digest
    assert digest == hashlib.sha256(json.dumps(as_json(table), sort_keys=True).encode()).hexdigest()
    seeds = table['paper']['presets']['quick']['notebooks']['table2_mnist']['seeds']
    seeds[10]['ptm'] = [0, 1]                            # and a changed value changes it
    path.write_text(yaml.safe_dump(table))
    assert hparams_digest() != digest
