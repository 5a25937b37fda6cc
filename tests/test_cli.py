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
