"""The console command end to end: `ptm-nb datasets`, `ptm-nb distill` (with its RESULT line, kill and resume,
and the picture of its set), `ptm-nb methods`, `ptm-nb --version`, and the errors a user meets first
(`ptm-nb evaluate` has tests/test_evaluate.py)."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PTM_NB = str(Path(sys.executable).parent / 'ptm-nb')      # the console script setup.sh installs


def ptm_nb(*args, env=None, timeout=300):
    return subprocess.run([PTM_NB, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _env(data_dir, **extra):
    return {**os.environ, 'PTM_DATA_DIR': str(data_dir), 'OMP_NUM_THREADS': '1', **extra}


def test_datasets_lists_the_folder(data_dir):
    r = ptm_nb('datasets', env=_env(data_dir))
    assert r.returncode == 0, r.stderr
    for name in ('breastmnist', 'pneumoniamnist', 'adrenalmnist3d'):
        assert name in r.stdout
    assert '546' in r.stdout and '4708' in r.stdout          # Table-1 counts computed from the files


def test_datasets_absent_and_broken(tmp_path, data_dir):
    r = ptm_nb('datasets', 'octmnist', env=_env(tmp_path), timeout=120)
    assert r.returncode == 2 and 'octmnist' in r.stderr
    broken = tmp_path / 'breastmnist.npz'
    raw = bytearray((data_dir / 'breastmnist.npz').read_bytes()); raw[len(raw) // 2] ^= 0xFF
    broken.write_bytes(bytes(raw))
    r = ptm_nb('datasets', env=_env(tmp_path))
    assert r.returncode == 2 and 'breastmnist' in r.stderr    # a present but broken file fails the listing
    r = ptm_nb('datasets', 'breastmnist', env=_env(tmp_path))
    assert r.returncode == 2 and 'md5' in r.stderr.lower()


def test_distill_errors_name_the_fix(data_dir, tmp_path):
    r = ptm_nb('distill', '--method', 'ptn', '--root', str(tmp_path), env=_env(data_dir), timeout=60)
    assert r.returncode == 2 and 'unknown method' in r.stderr and 'ptm' in r.stderr
    r = ptm_nb('distill', '--method', 'random', '--ipc', '1000', '--root', str(tmp_path), env=_env(data_dir), timeout=60)
    assert r.returncode == 2 and 'ipc=1000' in r.stderr and 'class' in r.stderr


def _distill(root, data_dir, *extra):
    return ['distill', '--dataset', 'breastmnist', '--method', 'ptm', '--ipc', '2', '--scale', 'smoke',
            '--device', 'cpu', '--root', str(root), '--no-progress', '--set', 'iterations=8', *extra]


def test_distill_kill_and_resume(data_dir, tmp_path):
    "A run killed after a checkpoint and started again ends with the images of a run that never stopped."
    whole = ptm_nb(*_distill(tmp_path / 'whole', data_dir), env=_env(data_dir))
    assert whole.returncode == 0, whole.stderr
    line = whole.stdout.strip().splitlines()[-1]
    assert line.startswith('RESULT acc_mean=') and ' acc_std=' in line and ' run=' in line
    run_dir = Path(line.split(' run=')[1])
    assert {'config.json', 'metrics.jsonl', 'synset.pt', 'eval.json', 'checkpoint.pt'} <= {p.name for p in run_dir.iterdir()}

    # the same run under another root: kill it as soon as its first checkpoint lands
    proc = subprocess.Popen([PTM_NB, *_distill(tmp_path / 'killed', data_dir)], cwd=ROOT,
                            env=_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / 'killed' / 'runs' / run_dir.name / 'checkpoint.pt'
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.05)
    if proc.poll() is not None: pytest.skip('the run finished before it could be killed (machine too fast for this test)')
    proc.send_signal(signal.SIGKILL); proc.wait()
    state = torch.load(ckpt, weights_only=False)
    assert 0 < state['state']['iteration'] < 8
    again = ptm_nb(*_distill(tmp_path / 'killed', data_dir), env=_env(data_dir))
    assert again.returncode == 0, again.stderr
    a = torch.load(run_dir / 'synset.pt', weights_only=True)
    b = torch.load(tmp_path / 'killed' / 'runs' / run_dir.name / 'synset.pt', weights_only=True)
    assert torch.equal(a['images'], b['images']) and a['lr'] == b['lr']


def test_datasets_with_nothing_there_says_where_it_looked(tmp_path):
    "An empty data root: exit 2 and what was looked for where, and how to get data; not an empty table."
    r = ptm_nb('datasets', env=_env(tmp_path), timeout=120)
    assert r.returncode == 2 and 'Empty DataFrame' not in r.stdout and not r.stdout.strip()
    for part in (str(tmp_path), 'breastmnist.npz', 'adrenalmnist3d.npz', 'PTM_DATA_DIR', '--root',
                 'python -m medmnist download', 'zenodo.org'):
        assert part in r.stderr, part
    other = tmp_path / 'other'
    r = ptm_nb('datasets', '--root', str(other), env=_env(tmp_path), timeout=120)
    assert r.returncode == 2 and f'no dataset found under {other}' in r.stderr


def test_methods_lists_the_registry():
    from ptm_nb.runs import register_baselines
    from ptm_nb.distill import METHODS
    register_baselines()
    r = ptm_nb('methods', timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ['name', 'family', 'experts'] and len(lines) == len(METHODS) + 1
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(METHODS)
    assert 'trajectory matching' in rows['ptm'] and ' plain ' in rows['ptm'] and ' flat ' in rows['ftd']
    assert 'distribution matching' in rows['dm'] and ' - ' in rows['dm'] and 'real images' in rows['random']
    assert METHODS['ptm'].description in rows['ptm']


def test_version():
    import ptm_nb as package
    r = ptm_nb('--version', timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f'ptm-nb {package.__version__}'


def test_distill_prints_the_picture(data_dir, tmp_path):
    r = ptm_nb('distill', '--dataset', 'breastmnist', '--method', 'random', '--ipc', '2', '--scale', 'smoke',
               '--device', 'cpu', '--root', str(tmp_path), '--no-progress', env=_env(data_dir))
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith('picture of the set: '))
    png = Path(line.split(': ', 1)[1])
    assert png.name == 'synset.png' and png.stat().st_size > 0 and (png.parent / 'synset.pt').exists()
    assert r.stdout.strip().splitlines()[-1].startswith('RESULT acc_mean=')


# ---- expert buffers on their own, and a run on a cluster (issue 17) ---------------------------------------

def _common(root, data_dir):
    return ['--dataset', 'breastmnist', '--scale', 'smoke', '--device', 'cpu', '--root', str(root),
            '--data-root', str(data_dir), '--no-progress']


def _stamps(*buffers) -> dict:
    "When each expert file of the buffers was written."
    return {p: p.stat().st_mtime_ns for b in buffers for p in sorted(b.glob('expert_*.pt'))}


def test_experts_trains_the_buffers_of_a_scale(data_dir, tmp_path):
    """In this process (--workers 0): the plain buffer that PTM, MTT, ... share and FTD's flat one; again:
    read back."""
    from ptm_nb.runs import expert_buffers
    r = ptm_nb('experts', '--workers', '0', *_common(tmp_path, data_dir), env=_env(data_dir))
    assert r.returncode == 0, r.stderr
    *folders, result = r.stdout.strip().splitlines()
    wanted = expert_buffers('breastmnist', 'smoke', root=tmp_path, device='cpu', data_root=data_dir)
    assert [line.split(': ')[0] for line in folders] == [str(f) for f in wanted]
    assert folders[0].endswith(': 2 plain experts × 3 epochs')
    assert folders[1].endswith(': 2 flat experts × 3 epochs')
    assert result == f'RESULT experts={",".join(map(str, wanted))} n=2,2 epochs=3,3'
    stamps = _stamps(*wanted)
    assert len(stamps) == 4                                             # two experts in each buffer
    again = ptm_nb('experts', '--workers', '0', *_common(tmp_path, data_dir), env=_env(data_dir))
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    assert _stamps(*wanted) == stamps                                   # read back, not trained again


def test_experts_errors_name_the_fix(data_dir, tmp_path):
    r = ptm_nb('experts', '--dataset', 'breastmnist', '--scale', 'quick', '--kind', 'plain', '--root',
               str(tmp_path), env=_env(data_dir), timeout=120)
    assert r.returncode == 2 and 'they read flat ones' in r.stderr and 'leave the kind out' in r.stderr
    assert r.stderr.count('\n') == 1 and not (tmp_path / 'experts').exists()
    r = ptm_nb('experts', '--root', str(tmp_path), env=_env(data_dir), timeout=120)
    assert r.returncode == 2 and '--dataset' in r.stderr


def test_experts_and_distill_on_a_cluster(data_dir, tmp_path):
    """--scheduler: `experts` sends its buffer, `distill` its run with the buffer, to a running Dask cluster
    (a LocalCluster started here); the run reads the buffer `experts` trained, and its set is the one a run
    in one process makes."""
    distributed = pytest.importorskip('distributed')
    env, root = _env(data_dir), tmp_path / 'cluster'
    run = ['--method', 'mtt', '--ipc', '2', '--set', 'iterations=2']
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=':0') as cluster:
        address = cluster.scheduler_address
        e = ptm_nb('experts', '--kind', 'plain', '--scheduler', address, *_common(root, data_dir), env=env)
        assert e.returncode == 0, e.stderr
        result = e.stdout.strip().splitlines()[-1]
        assert result.startswith('RESULT experts=') and result.endswith(' n=2 epochs=3')
        buffer = Path(result.split('experts=')[1].split(' n=')[0])
        stamps = _stamps(buffer)
        d = ptm_nb('distill', *run, '--scheduler', address, *_common(root, data_dir), env=env)
        assert d.returncode == 0, d.stderr
    line = d.stdout.strip().splitlines()[-1]
    assert line.startswith('RESULT acc_mean=')
    run_dir = Path(line.split(' run=')[1])
    assert run_dir.parent == root / 'runs' and (run_dir / 'eval.json').exists()
    assert [p for p in (root / 'experts').iterdir() if p.is_dir()] == [buffer]
    assert _stamps(buffer) == stamps and len(stamps) == 2                # the run read it, did not retrain
    here = ptm_nb('distill', *run, *_common(tmp_path / 'here', data_dir), env=env)      # no cluster
    assert here.returncode == 0, here.stderr
    a = torch.load(run_dir / 'synset.pt', weights_only=True)
    b = torch.load(tmp_path / 'here' / 'runs' / run_dir.name / 'synset.pt', weights_only=True)
    assert torch.equal(a['images'], b['images']) and a['lr'] == b['lr']    # one thread each: bit-identical
