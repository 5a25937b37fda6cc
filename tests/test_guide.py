"""What the README promises a newcomer: its first command needs no data folder (a missing MedMNIST file is
downloaded into medmnist's folder and checked against its md5), the offline form sits beside it, and a dataset
added through a user manifest (`$PTM_MANIFEST`) reaches the command line."""
import hashlib, os, re, subprocess, sys
from pathlib import Path
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / 'ptm-nb')]       # the console script of this environment

# `ptm-nb distill` in a fresh process whose network is a function serving the real file (or a damaged copy)
DOWNLOAD = """
import io, sys
from pathlib import Path
import ptm_nb.manifest
payload, asked = Path(sys.argv[1]).read_bytes(), []
def urlopen(url, timeout=None):
    asked.append(getattr(url, 'full_url', url)); return io.BytesIO(payload if sys.argv[3] == 'good' else payload[:-10])
ptm_nb.manifest.urlopen = urlopen
from ptm_nb.cli import main
rc = main(['distill', '--dataset', 'breastmnist', '--method', 'random', '--ipc', '2', '--scale', 'smoke',
           '--device', 'cpu', '--root', sys.argv[2], '--no-progress'])
print('ASKED', *asked)
sys.exit(rc)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ('PTM_DATA_DIR', 'PTM_MANIFEST')}
    return {**env, 'OMP_NUM_THREADS': '1', **extra}


def test_the_first_command_needs_no_data_folder():
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    first = re.search(r'```sh\n(.*?)\n', readme).group(1)
    assert first == ('bash setup.sh && .venv/bin/ptm-nb distill --dataset breastmnist --method ptm --ipc 2 '
                     '--scale smoke')
    assert 'export PTM_DATA_DIR=' in readme                                       # the offline form beside it
    assert '.venv/bin/jupyter lab nbs/' in readme


def test_distill_downloads_a_missing_file_into_medmnist_folder(tmp_path, need_file):
    real = need_file('breastmnist.npz')
    home = tmp_path / 'home'; home.mkdir()
    r = subprocess.run([sys.executable, '-c', DOWNLOAD, str(real), str(tmp_path / 'out'), 'good'], cwd=REPO,
                       env=_env(HOME=str(home)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = home / '.medmnist' / 'breastmnist.npz'                                  # medmnist's default root
    assert hashlib.md5(got.read_bytes()).hexdigest() == '750601b1f35ba3300ea97c75c52ff8f6'
    assert 'ASKED https://zenodo.org/records/10519652/files/breastmnist.npz' in r.stdout
    assert 'RESULT acc_mean=' in r.stdout
    # a download whose md5 is wrong is not kept, and the message says what to do
    home2 = tmp_path / 'home2'; home2.mkdir()
    r = subprocess.run([sys.executable, '-c', DOWNLOAD, str(real), str(tmp_path / 'out2'), 'damaged'],
                       cwd=REPO, env=_env(HOME=str(home2)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'not kept' in r.stderr and '750601b1f35ba3300ea97c75c52ff8f6' in r.stderr
    assert not (home2 / '.medmnist' / 'breastmnist.npz').exists()


def test_a_user_manifest_reaches_the_command_line(tmp_path):
    rng, arrays = np.random.default_rng(0), {}
    for split, n in (('train', 40), ('val', 10), ('test', 20)):
        arrays[f'{split}_images'] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f'{split}_labels'] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(tmp_path / 'toyscan.npz', **arrays)
    sha = hashlib.sha256((tmp_path / 'toyscan.npz').read_bytes()).hexdigest()
    (tmp_path / 'manifest.yaml').write_text('datasets:\n  toyscan:\n    kind: npz\n    file: toyscan.npz\n'
                                            f'    sha256: {sha}\n    class_names: [negative, positive]\n')
    env = _env(PTM_MANIFEST=str(tmp_path / 'manifest.yaml'))
    r = subprocess.run([*CLI, 'datasets', 'toyscan', '--root', str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'toyscan' in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*CLI, 'distill', '--dataset', 'toyscan', '--method', 'random', '--device', 'cpu',
                        '--data-root', str(tmp_path), '--root', str(tmp_path / 'out'), '--no-progress'],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'RESULT acc_mean=' in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*CLI, 'datasets', 'toyscan', '--root', str(tmp_path)], env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown dataset 'toyscan'" in r.stderr                # without the manifest
