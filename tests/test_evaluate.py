"""`ptm-nb evaluate PATH`: a synthetic set from disk (this project's synset.pt, an npz, MTT-style separate
tensor files) evaluated under a scale's protocol, with the record of a run's eval.json written beside it; and
every set that does not fit its dataset refused with one line that names the file and the fix (exit 2).
Tiny sets (BreastMNIST, 2 classes × 2 images) at smoke scale: each test takes seconds."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from ptm_nb.cli import main
from ptm_nb.data import load_dataset, real_per_class
from ptm_nb.distill import SyntheticSet
from ptm_nb.evaluate import evaluate_set
from ptm_nb.runs import RunSpec, load_hparams, run
from ptm_nb.train import results_of

ROOT = Path(__file__).resolve().parents[1]
PTM_NB = str(Path(sys.executable).parent / 'ptm-nb')
RUN_FIELDS = {'acc_mean', 'acc_std', 'accs', 'auc_mean', 'auc_std', 'bal_acc_mean', 'bal_acc_std', 'lr',
              'nets', 'epochs', 'reported_at', 'device', 'val_acc_mean', 'val_acc_std', 'val_auc_mean',
              'val_auc_std', 'val_bal_acc_mean', 'val_bal_acc_std'}                 # a run's eval.json
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def breast(data_dir):
    return load_dataset('breastmnist', root=data_dir, download=False)


@pytest.fixture(scope='module')
def tiny(breast):
    "2 classes × 2 real BreastMNIST images, normalised as the dataset, and their labels."
    return real_per_class(breast.train_x, breast.train_y, 2, 2, torch.Generator().manual_seed(0))


def evaluate(capsys, data_dir, *args):
    "Run `ptm-nb evaluate` in this process: (exit status, stdout, stderr)."
    rc = main(['evaluate', *map(str, args), '--device', 'cpu', '--data-root', str(data_dir)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def smoke_eval():
    return load_hparams()['scales']['smoke']['eval']


def test_synset_pt_uses_its_provenance(tmp_path, data_dir, tiny, capsys):
    x, y = tiny
    prov = {'dataset': 'breastmnist', 'method': 'mtt'}
    SyntheticSet(x, y, 0.02, 2, 2, provenance=prov).save(tmp_path / 'synset.pt')
    rc, out, err = evaluate(capsys, data_dir, tmp_path / 'synset.pt')      # no --dataset: the file says it
    assert rc == 0, err
    rec = json.loads((tmp_path / 'synset.pt.eval.json').read_text())
    assert RUN_FIELDS <= set(rec) and rec['reported_at'] == 'final epoch' and rec['device'] == 'cpu'
    assert (rec['nets'], rec['epochs']) == (smoke_eval()['nets'], smoke_eval()['epochs'])
    assert (rec['dataset'], rec['kind'], rec['lr'], rec['images']) == ('breastmnist', 'synset', 0.02, 4)
    assert len(rec['accs']) == rec['nets'] and 0 <= rec['acc_mean'] <= 1 and 0 <= rec['val_acc_mean'] <= 1
    assert json.loads(out[:out.rindex('}') + 1]) == rec                         # printed and written alike
    assert f"wrote {tmp_path / 'synset.pt.eval.json'}" in out


def test_npz(tmp_path, data_dir, tiny, capsys):
    x, y = tiny
    np.savez(tmp_path / 'set.npz', images=x.numpy(), labels=y.numpy(), lr=np.float64(0.05))
    rc, _, err = evaluate(capsys, data_dir, tmp_path / 'set.npz', '--dataset', 'breastmnist')
    assert rc == 0, err
    rec = json.loads((tmp_path / 'set.npz.eval.json').read_text())
    assert (rec['kind'], rec['lr'], rec['soft_labels']) == ('npz', 0.05, False)
    np.savez(tmp_path / 'nolr.npz', images=x.numpy(), labels=y.numpy())        # no lr: the protocol's 0.01
    rc, _, err = evaluate(capsys, data_dir, tmp_path / 'nolr.npz', '--dataset', 'breastmnist')
    assert rc == 0 and json.loads((tmp_path / 'nolr.npz.eval.json').read_text())['lr'] == 0.01


def test_separate_tensor_files(tmp_path, data_dir, tiny, capsys):
    "MTT-family files images_best.pt / labels_best.pt / lr_best.pt in a folder; --out: the record elsewhere."
    x, y = tiny
    folder = tmp_path / 'logged_files'; folder.mkdir()
    torch.save(x, folder / 'images_best.pt'); torch.save(y, folder / 'labels_best.pt')
    torch.save(torch.tensor(0.03), folder / 'lr_best.pt')
    torch.save(x * 0, folder / 'images_500.pt'); torch.save(y, folder / 'labels_500.pt')   # best wins
    rc, _, err = evaluate(capsys, data_dir, folder, '--dataset', 'breastmnist', '--out', tmp_path / 'r.json')
    assert rc == 0, err
    rec = json.loads((tmp_path / 'r.json').read_text())
    assert rec['source'] == str(folder / 'images_best.pt') and rec['kind'] == 'tensors'
    assert abs(rec['lr'] - 0.03) < 1e-7
    same = evaluate_set(folder / 'images_best.pt', 'breastmnist', device='cpu', data_root=data_dir)
    assert same['accs'] == rec['accs']                                   # a file of the set, or its folder


def test_a_runs_synset_gives_the_runs_record(tmp_path, data_dir, breast):
    "Same protocol as `ptm_nb.runs.run`: a run's synset.pt, evaluated again, gives its eval.json exactly."
    res = run(RunSpec('random', 'breastmnist', 2, 'smoke', device='cpu'), root=tmp_path, dataset=breast,
              progress=False)
    rec = evaluate_set(res.folder.path / 'synset.pt', device='cpu', data_root=data_dir)
    assert results_of({k: rec[k] for k in res.eval}) == results_of(res.eval)     # all but the wall time


def _write(tmp_path, tiny, what):
    "A set with one thing wrong; returns (path, extra args)."
    x, y = tiny
    if what == 'channels':
        np.savez(tmp_path / 'rgb.npz', images=x.repeat(1, 3, 1, 1).numpy(), labels=y.numpy())
        return tmp_path / 'rgb.npz'
    if what == 'size':
        np.savez(tmp_path / 'big.npz', images=np.zeros((4, 1, 32, 32), np.float32), labels=y.numpy())
        return tmp_path / 'big.npz'
    if what == 'classes':
        np.savez(tmp_path / 'three.npz', images=x.numpy(), labels=np.array([0, 1, 2, 2]))
        return tmp_path / 'three.npz'
    if what == 'count':
        np.savez(tmp_path / 'short.npz', images=x.numpy(), labels=y[:3].numpy())
        return tmp_path / 'short.npz'
    if what in ('lr_nan', 'lr_zero'):
        folder = tmp_path / 'mtt'; folder.mkdir()
        torch.save(x, folder / 'images_best.pt'); torch.save(y, folder / 'labels_best.pt')
        torch.save(torch.tensor(float('nan') if what == 'lr_nan' else 0.0), folder / 'lr_best.pt')
        return folder
    if what == 'lr_inf_npz':
        np.savez(tmp_path / 'inf.npz', images=x.numpy(), labels=y.numpy(), lr=np.float64('inf'))
        return tmp_path / 'inf.npz'
    if what == 'kind':
        (tmp_path / 'set.txt').write_text('not a set')
        return tmp_path / 'set.txt'
    raise ValueError(what)


@pytest.mark.parametrize('what, file, parts', [
    ('channels', 'rgb.npz', ['images have 3 channel(s), breastmnist has 1',
                             'Fix: evaluate on a dataset with 3']),
    ('size', 'big.npz', ['images are 32×32 px, breastmnist is 28×28 px', 'Fix:', '--dataset breastmnist_32']),
    ('classes', 'three.npz', ['(field labels)', 'the labels name 3 classes, breastmnist has 2',
                              'Fix: evaluate on the dataset the set was distilled from']),
    ('count', 'short.npz', ['3 labels for 4 images', 'Fix: give one label per image']),
    ('lr_nan', 'lr_best.pt', ['lr=nan is not a positive finite number', 'Fix: give the learning rate']),
    ('lr_zero', 'lr_best.pt', ['lr=0.0 is not a positive finite number']),
    ('lr_inf_npz', 'inf.npz (field lr)', ['lr=inf is not a positive finite number']),
    ('kind', 'set.txt', ["unknown file kind '.txt'", 'Fix: pass a synset.pt, an .npz']),
])
def test_mismatches_are_one_line_naming_the_file(tmp_path, data_dir, tiny, capsys, what, file, parts):
    path = _write(tmp_path, tiny, what)
    rc, out, err = evaluate(capsys, data_dir, path, '--dataset', 'breastmnist')
    assert rc == 2 and err.count('\n') == 1 and err.startswith('ptm-nb evaluate: error: '), err
    assert file in err and all(p in err for p in parts), err
    assert not list(tmp_path.rglob('*.eval.json'))                             # nothing written


def test_missing_dataset(tmp_path, data_dir, tiny, capsys):
    x, y = tiny
    np.savez(tmp_path / 'set.npz', images=x.numpy(), labels=y.numpy())
    rc, _, err = evaluate(capsys, data_dir, tmp_path / 'set.npz')          # an npz does not say its dataset
    assert rc == 2 and 'set.npz' in err and 'does not say which dataset' in err and '--dataset NAME' in err
    rc = main(['evaluate', str(tmp_path / 'set.npz'), '--dataset', 'breastmnist',
               '--data-root', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and "dataset 'breastmnist' is not under the data root" in err
    assert str(tmp_path / 'breastmnist.npz') in err and 'PTM_DATA_DIR' in err
    rc, _, err = evaluate(capsys, data_dir, tmp_path / 'set.npz', '--dataset', 'breastmnsit')
    assert rc == 2 and "unknown dataset 'breastmnsit'" in err and 'breastmnist' in err


def test_console_script(tmp_path, data_dir, tiny):
    "The installed `ptm-nb evaluate` end to end: the record on stdout and beside the file."
    x, y = tiny
    SyntheticSet(x, y, 0.02, 2, 2, provenance={'dataset': 'breastmnist'}).save(tmp_path / 'synset.pt')
    env = {**os.environ, 'PTM_DATA_DIR': str(data_dir), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([PTM_NB, 'evaluate', str(tmp_path / 'synset.pt'), '--device', 'cpu'], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"acc_mean"' in r.stdout and f"wrote {tmp_path / 'synset.pt.eval.json'}" in r.stdout
    assert (tmp_path / 'synset.pt.eval.json').exists()
