"""Run and expert folders are safe to read and heal themselves.

Safe: every `torch.load` of the package uses `weights_only=True`, so a file planted in a run or expert folder
(a pickle that would run code when loaded) is refused; its code never runs, and the message names the file.
Self-healing: a damaged `synset.pt`, `checkpoint.pt`, `eval_checkpoint.pt` or `eval.json` is named in a
one-line warning, moved aside to `<name>.corrupt`, and its work is done again from the last good state, to the
numbers an undamaged run gives. Checked: a run and its experts record the sha256 of every file they write
(`digests.json`, the experts' `meta.json`), so a byte changed under the same size and mtime, which still
parses, is found, named and redone the same way; a run without digests (an older record) is read as it is.
Each case starts from a copy of one finished smoke run (PTM on BreastMNIST, ipc 2)."""
import io as stdio, json, os, re, shutil, warnings
from pathlib import Path
import pytest
import torch
import ptm_nb.train as train
from ptm_nb.data import load_dataset
from ptm_nb.distill import RunFolder
from ptm_nb.experts import ExpertBuffer, ExpertError, expert_path
from ptm_nb.io import DIGESTS, CorruptFile, CorruptFileWarning, read_tensors
from ptm_nb.runs import RunSpec, run
from ptm_nb.train import results_of

ROOT = Path(__file__).resolve().parents[1]
SPEC = RunSpec('ptm', 'breastmnist', 2, 'smoke', device='cpu')
pytestmark = pytest.mark.usefixtures('one_thread')


class Planted:
    "Loaded by an unsafe `torch.load`, this creates `marker`: what a crafted .pt file does with os.system."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (stdio.open, (self.marker, 'w'))


def plant(path: Path, marker: Path):
    "Replace the file at `path` with a pickle that would create `marker` if it were loaded unsafely."
    path.unlink(missing_ok=True)
    torch.save({'images': torch.zeros(2), 'state': {'iteration': 1}, 'payload': Planted(marker)}, path)


def truncate(path: Path, marker=None): path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
def garble(path: Path, marker=None): path.write_bytes(b'\xff\xfe\x00 not UTF-8 ' + path.read_bytes()[:40])
DAMAGE = {'truncate': truncate, 'plant': plant, 'garble': garble}


@pytest.fixture(scope='module')
def whole(tmp_path_factory, data_dir):
    "A finished smoke run that was never stopped nor damaged: (its root, its result, the dataset)."
    ds = load_dataset('breastmnist', root=data_dir)
    root, threads = tmp_path_factory.mktemp('whole'), torch.get_num_threads()
    torch.set_num_threads(1)                              # as the tests that compare with it (one_thread)
    try: result = run(SPEC, root=root, dataset=ds, progress=False)
    finally: torch.set_num_threads(threads)
    return root, result, ds


def copy_of(whole, tmp_path) -> tuple[Path, Path]:
    "A copy of the finished run's root (experts keep their mtimes: not trained again); (root, run folder)."
    root = tmp_path / 'root'
    shutil.copytree(whole[0], root)
    return root, root / 'runs' / whole[1].folder.path.name


def run_again(root, ds, path: Path):
    "Run the spec again in `root`; the result and the one warning that names `path`."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        result = run(SPEC, root=root, dataset=ds, progress=False)
    said = [str(w.message) for w in seen if w.category is CorruptFileWarning]
    assert len(said) == 1 and said[0].startswith(f'{path}: ') and '\n' not in said[0], said
    print(said[0])
    return result, said[0]


def assert_same_result(got, whole_result):
    "The run ended with a valid result, equal to the undamaged run's."
    assert torch.equal(got.synset.images, whole_result.synset.images)
    assert torch.equal(got.synset.labels, whole_result.synset.labels)
    assert got.synset.lr == whole_result.synset.lr
    assert results_of(got.eval) == results_of(whole_result.eval) and 0 <= got.eval['acc_mean'] <= 1
    again = RunFolder(got.folder.path)                   # what was written reads back whole
    assert again.load_eval() == got.eval and torch.equal(again.load_synset().images, got.synset.images)


def assert_set_aside(path: Path, damaged: bytes):
    assert path.with_name(path.name + '.corrupt').read_bytes() == damaged


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(p.name, m.group(0)) for p in (ROOT / 'ptm_nb').rglob('*.py')
             for m in re.finditer(r'torch\.load\([^)]*\)', p.read_text(encoding='utf-8'))]
    assert calls and all('weights_only=True' in c for _, c in calls), calls


def test_the_planted_file_would_run_code_if_loaded_unsafely(tmp_path):
    "The control: the planted pickle is a real threat, so the tests below that load it safely have teeth."
    plant(tmp_path / 'x.pt', tmp_path / 'marker')
    torch.load(tmp_path / 'x.pt', weights_only=False)
    assert (tmp_path / 'marker').exists()


@pytest.mark.parametrize('how', ['truncate', 'plant'])
def test_a_damaged_synset_is_made_again(whole, tmp_path, how):
    root, folder = copy_of(whole, tmp_path)
    path, marker = folder / 'synset.pt', tmp_path / 'marker'
    DAMAGE[how](path, marker)
    damaged = path.read_bytes()
    path.with_name('synset.pt.corrupt').write_bytes(b'an older damaged copy')     # replaced by the new one
    with pytest.raises(CorruptFile, match=re.escape(f'{path}: ')): read_tensors(path)
    result, said = run_again(root, whole[2], path)
    assert said.endswith('moved aside to synset.pt.corrupt: the set is made again '
                         '(from checkpoint.pt where there is one)')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])
    assert not marker.exists()


@pytest.mark.parametrize('how', ['truncate', 'garble'])
@pytest.mark.parametrize('digests', ['kept', 'absent'])
def test_a_damaged_evaluation_is_made_again(whole, tmp_path, how, digests):
    root, folder = copy_of(whole, tmp_path)
    if digests == 'absent': (folder / DIGESTS).unlink()          # an older record: the parser tells
    path = folder / 'eval.json'
    DAMAGE[how](path)
    damaged = path.read_bytes()
    result, said = run_again(root, whole[2], path)
    assert ('its sha256 is ' if digests == 'kept' else 'not valid JSON') in said
    assert said.endswith('moved aside to eval.json.corrupt: the set is evaluated again')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])                 # the same seed: the same numbers


def killed_evaluation(root, ds, monkeypatch) -> list[Path]:
    "Run the spec, stopped at epoch 4 of the evaluation (its state saved after every epoch); the checkpoints."
    with monkeypatch.context() as m:
        m.setattr(train, 'EVAL_CHECKPOINT_EVERY_S', 0.)
        lr_at = train.TrainConfig.lr_at
        def killed_at_epoch_4(self, epoch):
            if epoch == 4: raise KeyboardInterrupt('simulated kill')
            return lr_at(self, epoch)
        m.setattr(train.TrainConfig, 'lr_at', killed_at_epoch_4)
        with pytest.raises(KeyboardInterrupt): run(SPEC, root=root, dataset=ds, progress=False)
    return sorted(root.glob('runs/*/eval_checkpoint*.pt'))


@pytest.mark.parametrize('how', ['truncate', 'plant'])
def test_a_damaged_evaluation_checkpoint_starts_the_evaluation_again(whole, tmp_path, monkeypatch, how):
    root, folder = copy_of(whole, tmp_path)
    (folder / 'eval.json').unlink()                       # the evaluation is to be made (again)
    path = killed_evaluation(root, whole[2], monkeypatch)[-1]
    assert read_tensors(path)['epoch'] == 4
    marker = tmp_path / 'marker'
    DAMAGE[how](path, marker)
    damaged = path.read_bytes()
    with pytest.raises(CorruptFile, match=re.escape(f'{path}: ')): read_tensors(path)
    result, said = run_again(root, whole[2], path)
    assert said.endswith(f'moved aside to {path.name}.corrupt: the training starts again from epoch 0')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])
    assert not marker.exists() and not list(folder.glob('eval_checkpoint*.pt'))


def killed_distillation(root, ds, monkeypatch, at: int = 2):
    "Run the spec in `root` and stop the distillation right after it saved its checkpoint at iteration `at`."
    save = RunFolder.save_checkpoint
    def killed_after_saving(self, state):
        save(self, state)
        if state['state']['iteration'] == at: raise KeyboardInterrupt('simulated kill')
    with monkeypatch.context() as m:
        m.setattr(RunFolder, 'save_checkpoint', killed_after_saving)
        with pytest.raises(KeyboardInterrupt): run(SPEC, root=root, dataset=ds, progress=False)


@pytest.mark.parametrize('how', ['truncate', 'plant'])
def test_a_damaged_checkpoint_mid_run_starts_the_distillation_again(whole, tmp_path, monkeypatch, how):
    root, folder = copy_of(whole, tmp_path)
    shutil.rmtree(folder)                                 # the experts stay; the run starts afresh
    killed_distillation(root, whole[2], monkeypatch)
    path, marker = folder / 'checkpoint.pt', tmp_path / 'marker'
    assert read_tensors(path)['state']['iteration'] == 2 and not (folder / 'synset.pt').exists()
    DAMAGE[how](path, marker)
    damaged = path.read_bytes()
    with pytest.raises(CorruptFile, match=re.escape(f'{path}: ')): read_tensors(path)
    result, said = run_again(root, whole[2], path)
    assert said.endswith('moved aside to checkpoint.pt.corrupt: '
                         'the distillation starts again from iteration 0')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])                  # the final images equal the uninterrupted run's
    logged = [r['iteration'] for r in RunFolder(folder).metrics()]
    assert logged == [r['iteration'] for r in whole[1].folder.metrics()]   # the first attempt's are dropped
    assert not marker.exists()


def test_a_planted_expert_file_is_refused_and_trained_again(whole, tmp_path):
    root, folder = copy_of(whole, tmp_path)
    [experts] = [p.parent for p in (root / 'experts').glob('*/meta.json')]
    path, marker = expert_path(experts, 0), tmp_path / 'marker'
    good = ExpertBuffer(experts).trajectory(0).clone()
    plant(path, marker)
    with pytest.raises(CorruptFile, match=re.escape(f'{path}: ')): read_tensors(path, mmap=True)
    with pytest.raises(ExpertError, match=re.escape(f'the expert file {path} cannot be read')) as e:
        ExpertBuffer(experts).trajectory(0)
    assert 'code, not data' in str(e.value) and not marker.exists()
    shutil.rmtree(folder)                                 # a new run reads the buffer: expert 0 trained again
    with pytest.warns(CorruptFileWarning, match=re.escape(f'{path}: its sha256 is ')):
        result = run(SPEC, root=root, dataset=whole[2], progress=False)
    assert torch.equal(ExpertBuffer(experts).trajectory(0), good) and not marker.exists()
    assert_same_result(result, whole[1])


def test_metrics_skip_torn_and_non_utf8_lines(whole, tmp_path):
    root, folder = copy_of(whole, tmp_path)
    records = RunFolder(folder).metrics()
    lines = (folder / 'metrics.jsonl').read_bytes().splitlines(keepends=True)
    garbage, torn = b'\xff\xfe\xfd garbage\n', b'{"iteration": 9, "match_lo'
    (folder / 'metrics.jsonl').write_bytes(lines[0] + garbage + b''.join(lines[1:]) + torn)
    assert RunFolder(folder).metrics() == records
    assert RunFolder(folder).load_checkpoint()['state']['iteration'] == records[-1]['iteration']
    assert (folder / 'metrics.jsonl').read_bytes() == b''.join(lines)          # rewritten without the garbage



def flip_keeping_stamp(path: Path, at: int) -> bytes:
    """Flip the low bit of byte `at` of the file, then give the file back its mtime (the size is unchanged):
    what a bit rot does, and what a (size, mtime) stamp cannot see. Returns the damaged bytes."""
    st, raw = path.stat(), bytearray(path.read_bytes())
    raw[at] ^= 1
    path.write_bytes(bytes(raw)); os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return bytes(raw)


def offset_of(path: Path, t: torch.Tensor) -> int:
    "Where the bytes of tensor `t` start in the file (torch.save stores them as they are)."
    at = path.read_bytes().find(t.contiguous().numpy().tobytes()[:64])
    assert at > 0, f'{path}: tensor bytes not found'
    return at


def still_parses(path: Path, read):
    "What `read` makes of the damaged file with no digest to check: a copy in a folder without digests.json."
    bare = path.parent.parent / 'bare' / path.name
    bare.parent.mkdir(exist_ok=True); shutil.copy(path, bare)
    return read(bare)


def test_a_changed_byte_in_a_synset_is_found_and_the_set_made_again(whole, tmp_path):
    root, folder = copy_of(whole, tmp_path)
    path, images = folder / 'synset.pt', whole[1].synset.images
    damaged = flip_keeping_stamp(path, offset_of(path, images))
    loaded = still_parses(path, read_tensors)['images']               # torch.load takes it: one pixel off
    assert loaded.shape == images.shape and (loaded != images).sum() == 1
    result, said = run_again(root, whole[2], path)
    assert 'its sha256 is ' in said and 'recorded in digests.json' in said
    assert said.endswith('moved aside to synset.pt.corrupt: the set is made again '
                         '(from checkpoint.pt where there is one)')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])


def test_a_changed_byte_in_an_evaluation_is_found_and_the_set_evaluated_again(whole, tmp_path):
    root, folder = copy_of(whole, tmp_path)
    path = folder / 'eval.json'
    digit = re.search(rb'"acc_mean": (\d)', path.read_bytes()).start(1)   # a digit stays a digit: still JSON
    damaged = flip_keeping_stamp(path, digit)
    assert still_parses(path, lambda p: json.loads(p.read_text()))['acc_mean'] != whole[1].eval['acc_mean']
    result, said = run_again(root, whole[2], path)
    assert 'its sha256 is ' in said
    assert said.endswith('moved aside to eval.json.corrupt: the set is evaluated again')
    assert_set_aside(path, damaged)
    assert_same_result(result, whole[1])                 # evaluated again, from the same seed


def test_a_changed_byte_in_an_expert_is_found_and_the_expert_trained_again(whole, tmp_path):
    root, folder = copy_of(whole, tmp_path)
    [experts] = [p.parent for p in (root / 'experts').glob('*/meta.json')]
    path = expert_path(experts, 1)
    good = ExpertBuffer(experts).trajectory(1).clone()
    damaged = flip_keeping_stamp(path, offset_of(path, good[-1]))
    assert (still_parses(path, lambda p: read_tensors(p)['trajectory']) != good).sum() == 1   # one weight off
    shutil.rmtree(folder)                                 # a new run reads the buffer
    result, said = run_again(root, whole[2], path)
    assert 'its sha256 is ' in said and 'recorded in meta.json' in said
    assert said.endswith('moved aside to expert_001.pt.corrupt: expert 1 is trained again')
    assert_set_aside(path, damaged)
    assert torch.equal(ExpertBuffer(experts).trajectory(1), good)      # trained again: the same expert
    assert_same_result(result, whole[1])


def test_a_run_without_digests_is_read_as_it_is(whole, tmp_path, monkeypatch):
    "An older record (no digests.json, new mtimes as in a clone) is read back: not recomputed, not written."
    root, folder = copy_of(whole, tmp_path)
    (folder / DIGESTS).unlink()
    for p in folder.iterdir(): os.utime(p)                # new mtimes
    import ptm_nb.runs
    def no_work(*a, **k): raise AssertionError('the finished run was evaluated again')
    monkeypatch.setattr(ptm_nb.runs, 'evaluate_synset', no_work)
    with warnings.catch_warnings():
        warnings.simplefilter('error', CorruptFileWarning)
        result = run(SPEC, root=root, dataset=whole[2], progress=False)
    assert result.eval == whole[1].eval and torch.equal(result.synset.images, whole[1].synset.images)
    assert not (folder / DIGESTS).exists()
