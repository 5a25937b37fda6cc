"""Bad input and a hostile machine, as a new user meets them: every case ends in one message that names the
key or the path and the fix, exit 2, before any work where the input is wrong, and nothing lost or half
written.

Overrides (`--set`, `RunSpec(overrides=...)`, a grid's specs) are checked against the method's resolved config
before anything runs; `--device` and `reproduce`'s selections likewise. OS failures (a folder where a data
file should be, a file that may not be read, a read-only or full disk) are one line naming the path and the
fix (`ptm_nb.cli.main`). A finished run reads back from a read-only copy; a run that fails before its first
result leaves no folder; a run waiting for another process's lock says so; the outputs index marks a notebook
whose last run failed.

This machine may run as root, whom chmod does not stop: permissions and read-only mounts are simulated by
patching the calls that open, create or rename files to raise what the kernel would, and each chmod-based
variant skips where chmod cannot take a right away."""
import builtins, errno, io, json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest
import torch
import ptm_nb.io
from ptm_nb.cli import main, _parse_sets
from ptm_nb.runs import RunSpec, run, run_id

pytestmark = pytest.mark.usefixtures('one_thread')
SMOKE = ['--scale', 'smoke', '--device', 'cpu', '--no-progress']


def cli(capsys, *argv) -> tuple:
    "`ptm-nb *argv` in this process: (exit status, stdout, stderr)."
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line(err: str, command: str = 'distill') -> str:
    "The one error line of `err`, checked to be one line that starts as the CLI's errors do."
    assert err.count('\n') == 1 and err.startswith(f'ptm-nb {command}: error: '), err
    return err.strip()


def files(root) -> dict:
    "{relative path: (size, mtime_ns)} of every file under `root` (what a failure must leave as it was)."
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob('*') if p.is_file()} if root.exists() else {}


def chmod_stops_me(tmp_path) -> bool:
    "Whether chmod takes a right away from this process (not as root, nor on a file system that ignores it)."
    if os.geteuid() == 0: return False
    probe = tmp_path / 'probe'
    probe.write_text('x'); probe.chmod(0)
    try: probe.read_text(); return False
    except PermissionError: return True
    finally: probe.chmod(0o600); probe.unlink()


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data_dir):
    "A root holding one finished random-real smoke run on BreastMNIST: (root, its run folder)."
    root = tmp_path_factory.mktemp('finished')
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try: res = run(RunSpec('random', 'breastmnist', 2, 'smoke', device='cpu'), root=root, data_root=data_dir,
                   progress=False)
    finally: torch.set_num_threads(threads)
    return root, res.folder.path


# ------------------------------------------------------------------------------------------------------------
# overrides: checked before anything runs

def test_unknown_override_names_the_key_and_the_close_names_before_experts_train(tmp_path, data_dir, capsys):
    def distill(method, pair): return cli(capsys, 'distill', '--method', method, '--root', tmp_path,
                                          '--data-root', data_dir, *SMOKE, '--set', pair)
    for method, key in (('random', 'nosuchkey'), ('ptm', 'nosuchkey'), ('ptm', 'lr_imgs'),
                        ('mtt', 'eval.epoch')):
        rc, _, err = distill(method, f'{key}=3')
        line = one_line(err)
        assert rc == 2 and f"override '{key}': not a knob of {method}" in line and '; known: ' in line, line
    assert 'did you mean lr_img' in distill('ptm', 'lr_imgs=3')[2]
    assert 'did you mean eval.epochs' in distill('ptm', 'eval.epoch=3')[2]
    rc, _, err = distill('random', 'experts.epochs=3')
    assert rc == 2 and 'random trains no experts' in one_line(err)
    rc, _, err = distill('ptm', 'seed=3')
    assert rc == 2 and 'use --seed' in one_line(err)
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'experts').exists()   # no work was done


@pytest.mark.parametrize('pair, form', [
    ('iterations=2.5', 'iterations takes an integer >= 1 (e.g. iterations=4'),
    ('iterations=true', 'iterations takes an integer >= 1'),
    ('iterations=0', 'iterations takes an integer >= 1'),
    ('lr_img=nan', 'lr_img takes a finite number > 0 (e.g. lr_img=100'),
    ('lr_img=.inf', 'lr_img takes a finite number > 0'),
    ('lr_img=inf', 'lr_img takes a finite number > 0'),
    ('lr_img=-1e-3', 'lr_img takes a finite number > 0'),
    ('lr_init=nan', 'lr_init takes a finite number > 0, a string or null'),
    ('img_momentum=1.5', 'img_momentum takes a finite number in [0, 1)'),
    ('eval.epochs=abc', "override eval.epochs='abc': eval.epochs takes an integer >= 1 (e.g. eval.epochs=10"),
    ('experts.kind=sharp', "experts.kind takes a string ('plain' | 'flat')"),
    ('net=resnet', "override net='resnet': not a network of ptm_nb.nets; choose one of"),
    ('net_options.width=8.5', 'net_options.width takes an integer >= 1'),
    ('schedule=growing', "ptm on breastmnist: TMConfig.schedule='growing': choose one of"),
    ('dsa=color_crap', 'unknown operations'),
])
def test_bad_override_value_names_the_key_and_the_form_before_any_work(pair, form, tmp_path, capsys):
    rc, _, err = cli(capsys, 'distill', '--method', 'ptm', '--root', tmp_path, *SMOKE, '--set', pair)
    assert rc == 2 and form in one_line(err), err
    assert not tmp_path.joinpath('runs').exists() and not tmp_path.joinpath('experts').exists()


def test_set_reads_exponents_and_leading_dots_as_numbers():
    "YAML 1.1 reads 1e-3 and 1E5 as text: --set reads them as the numbers they are (and nan, inf, to refuse)."
    sets = _parse_sets(['lr_img=1e-3', 'lr_lr=1E-7', 'backend_p=.5', 'iterations=10', 'lr_init=matched',
                        'batch_syn=null'])
    assert sets == {'lr_img': 0.001, 'lr_lr': 1e-7, 'backend_p': 0.5, 'iterations': 10, 'lr_init': 'matched',
                    'batch_syn': None}
    cfg = RunSpec('mtt_backend', 'breastmnist', 2, 'smoke', overrides=sets).resolve()     # all accepted
    assert cfg['hp']['lr_img'] == 0.001 and isinstance(cfg['hp']['lr_img'], float)
    assert run_id(cfg) == run_id(RunSpec('mtt_backend', 'breastmnist', 2, 'smoke', overrides={
        **sets, 'lr_img': 0.001}).resolve())
    with pytest.raises(ValueError, match=r"--set 'lr_img': write key=value"): _parse_sets(['lr_img'])
    with pytest.raises(ValueError, match='is not readable'): _parse_sets(['loops={1: [1,'])


def test_grid_and_paper_specs_are_checked_when_planned(tmp_path):
    "A sweep's or a paper notebook's specs go through the same check: the plan fails before a buffer trains."
    from ptm_nb.grid import plan
    specs = [RunSpec('mtt', 'breastmnist', 2, 'smoke', device='cpu'),
             RunSpec('ptm', 'breastmnist', 2, 'smoke', device='cpu', overrides={'retrain': 0})]
    with pytest.raises(ValueError, match=r"override 'retrain': not a knob of ptm \(did you mean retrain_k"):
        plan(specs, tmp_path)
    assert not any(tmp_path.iterdir())


def test_device_is_checked_before_anything_is_written(tmp_path, data_dir, capsys, finished):
    def distill(device): return cli(capsys, 'distill', '--method', 'random', '--root', tmp_path / 'out',
                                    '--device', device)
    for device in ('tpu', 'cuda:x', 'gpu'):
        rc, _, err = distill(device)
        assert rc == 2 and one_line(err).endswith('use --device auto, cpu, cuda, cuda:N or mps'), err
    if not torch.cuda.is_available():
        rc, _, err = distill('cuda')
        assert rc == 2 and "device='cuda' but no CUDA device is available here: use --device cpu or" in err
    rc, _, err = cli(capsys, 'evaluate', finished[1] / 'synset.pt', '--device', 'tpu', '--out',
                     tmp_path / 'r.json')
    assert rc == 2 and 'tpu' in one_line(err, 'evaluate')
    rc, _, err = cli(capsys, 'reproduce', '--device', 'tpu', '--out', tmp_path / 'out', '--no-progress')
    assert rc == 2 and 'tpu' in one_line(err, 'reproduce')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'r.json').exists()


def test_reproduce_selections_are_checked_before_kernels_start(tmp_path, capsys):
    out = tmp_path / 'out'
    for flag, value, said in (('--datasets', 'nosuchset', "--datasets nosuchset: unknown dataset"),
                              ('--datasets', 'pathmnist,breastmnst', 'Close names: breastmnist'),
                              ('--datasets', ',', "--datasets ',' names no dataset"),
                              ('--only', ',', "--only ',' names no notebook"),
                              ('--only', ' ', "--only ' ' names no notebook"),
                              ('--methods', ',', '--methods names no method'),
                              ('--ipcs', ',', '--ipcs')):
        rc, _, err = cli(capsys, 'reproduce', '--out', out, '--no-progress', '--only', 'table1', flag, value)
        assert rc == 2 and said in one_line(err, 'reproduce'), (flag, value, err)
    assert not out.exists()                                  # no kernel started, no folder made


# ------------------------------------------------------------------------------------------------------------
# the data root

def test_a_folder_where_the_data_file_should_be(tmp_path, data_dir, capsys):
    root = tmp_path / 'data'; (root / 'breastmnist.npz').mkdir(parents=True)
    shutil.copy(data_dir / 'adrenalmnist3d.npz', root)
    rc, _, err = cli(capsys, 'distill', '--method', 'random', '--data-root', root, '--root', tmp_path / 'out',
                     *SMOKE)
    line = one_line(err)
    assert rc == 2 and f'{root / "breastmnist.npz"} is a folder, not the data file breastmnist.npz' in line
    assert 'Fix: move that folder away (mv' in line and 'breastmnist.npz' in line.split('Fix:')[1]
    assert not (tmp_path / 'out').exists()                  # nothing written for a run that could not start
    rc, out, err = cli(capsys, 'datasets', '--root', root)
    assert rc == 2 and 'breastmnist' in err and 'adrenalmnist3d' in out    # the rest of the table is there
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == 'breastmnist')
    assert 'error:' in row and 'is a folder' in row
    assert (root / 'breastmnist.npz').is_dir() and not any((root / 'breastmnist.npz').iterdir())


def _unreadable(monkeypatch, path: Path):
    "Reading `path` raises PermissionError, as it would after chmod a-r for a user that is not root."
    real = builtins.open
    def guarded(file, *args, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real(file, *args, **kw)
    monkeypatch.setattr(builtins, 'open', guarded)
    monkeypatch.setattr(io, 'open', guarded)


def _check_unreadable(capsys, tmp_path, root, target):
    rc, _, err = cli(capsys, 'distill', '--method', 'random', '--data-root', root, '--root', tmp_path / 'out',
                     *SMOKE)
    line = one_line(err)
    assert rc == 2 and line.startswith(f'ptm-nb distill: error: {target}: Permission denied. Fix: '), line
    assert f'chmod u+rwX {target}' in line and not (tmp_path / 'out').exists()
    rc, out, err = cli(capsys, 'datasets', '--root', root)         # one unreadable file is a row, not the end
    assert rc == 2 and 'breastmnist' in err and 'adrenalmnist3d' in out and ' ok ' in out
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == 'breastmnist')
    assert 'unreadable:' in row and 'Permission denied' in row and 'chmod a+r' in row, row


def test_a_data_file_without_read_permission(tmp_path, data_dir, capsys, monkeypatch):
    root = tmp_path / 'data'; root.mkdir()
    for name in ('breastmnist.npz', 'adrenalmnist3d.npz'): shutil.copy(data_dir / name, root)
    _unreadable(monkeypatch, root / 'breastmnist.npz')
    _check_unreadable(capsys, tmp_path, root, root / 'breastmnist.npz')


def test_a_data_file_without_read_permission_chmod(tmp_path, data_dir, capsys):
    if not chmod_stops_me(tmp_path): pytest.skip('chmod takes no right away here (root, or a file system)')
    root = tmp_path / 'data'; root.mkdir()
    for name in ('breastmnist.npz', 'adrenalmnist3d.npz'): shutil.copy(data_dir / name, root)
    (root / 'breastmnist.npz').chmod(0o200)
    try: _check_unreadable(capsys, tmp_path, root, root / 'breastmnist.npz')
    finally: (root / 'breastmnist.npz').chmod(0o600)


# ------------------------------------------------------------------------------------------------------------
# the outputs folder: read-only, full, a folder in the way

class ReadOnly:
    "Every write under `root` fails as on a read-only mount (EROFS); reads go on. Simulated, for root too."
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, monkeypatch, root):
        self.root, self.attempts = os.path.abspath(root), []
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        def under(p):
            try: return os.path.abspath(os.fspath(p)).startswith(self.root)
            except TypeError: return False                      # a file descriptor
        def deny(p):
            self.attempts.append(os.fspath(p))
            raise OSError(errno.EROFS, 'Read-only file system', os.fspath(p))
        def open_(file, mode='r', *args, **kw):
            if any(c in mode for c in 'wax+') and under(file): deny(file)
            return real_open(file, mode, *args, **kw)
        def os_open(path, flags, *args, **kw):
            if flags & self.WRITE_FLAGS and under(path): deny(path)
            return real_os_open(path, flags, *args, **kw)
        def mkdir(path, *args, **kw):
            if under(path):
                if os.path.exists(path): raise FileExistsError(errno.EEXIST, 'File exists', os.fspath(path))
                deny(path)
            return real_mkdir(path, *args, **kw)
        def one(real):
            def guarded(path, *args, **kw):
                if under(path): deny(path)
                return real(path, *args, **kw)
            return guarded
        def two(real):
            def guarded(src, dst, *args, **kw):
                if under(src) or under(dst): deny(dst)
                return real(src, dst, *args, **kw)
            return guarded
        for mod, name, fake in ((builtins, 'open', open_), (io, 'open', open_), (os, 'open', os_open),
                                (os, 'mkdir', mkdir), (os, 'remove', one(os.remove)),
                                (os, 'unlink', one(os.unlink)), (os, 'rmdir', one(os.rmdir)),
                                (os, 'chmod', one(os.chmod)),
                                (os, 'utime', one(os.utime)), (os, 'replace', two(os.replace)),
                                (os, 'rename', two(os.rename))):
            monkeypatch.setattr(mod, name, fake)


def _read_back(capsys, root, run_folder, data_dir):
    "The finished run read back through `ptm-nb distill` and `ptm-nb results`; nothing under `root` changes."
    before = files(root)
    rc, out, err = cli(capsys, 'distill', '--method', 'random', '--root', root, '--data-root', data_dir,
                       *SMOKE)
    assert rc == 0, err
    assert out.strip().splitlines()[-1].startswith('RESULT acc_mean=') and str(run_folder) in out
    rc, out, err = cli(capsys, 'results', '--root', root)
    assert rc == 0 and run_folder.name in out, err
    assert files(root) == before


def test_a_finished_run_reads_back_from_a_read_only_copy(finished, tmp_path, data_dir, capsys, monkeypatch):
    copy = tmp_path / 'copy'; shutil.copytree(finished[0], copy)
    for lock in copy.rglob('.*lock'): lock.unlink()          # a copy by hand need not carry the lock files
    guard = ReadOnly(monkeypatch, copy)
    _read_back(capsys, copy, copy / 'runs' / finished[1].name, data_dir)
    assert guard.attempts == []                              # not even the lock was opened for writing
    # a new run there is one line naming the folder and the fix, and leaves the copy as it was
    before = files(copy)
    rc, _, err = cli(capsys, 'distill', '--method', 'random', '--ipc', '1', '--root', copy, '--data-root',
                     data_dir, *SMOKE)
    line = one_line(err)
    assert rc == 2 and ': Read-only file system. Fix: the file system is read-only: write to a' in line
    assert str(copy / 'runs') in line and files(copy) == before


def test_a_finished_run_reads_back_from_a_read_only_copy_chmod(finished, tmp_path, data_dir, capsys):
    if not chmod_stops_me(tmp_path): pytest.skip('chmod takes no right away here (root, or a file system)')
    copy = tmp_path / 'copy'; shutil.copytree(finished[0], copy)
    for lock in copy.rglob('.*lock'): lock.unlink()
    paths = [copy, *copy.rglob('*')]
    for p in paths: p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        _read_back(capsys, copy, copy / 'runs' / finished[1].name, data_dir)
        rc, _, err = cli(capsys, 'distill', '--method', 'random', '--ipc', '1', '--root', copy,
                         '--data-root', data_dir, *SMOKE)
        assert rc == 2 and 'Permission denied. Fix: give your user access to it' in one_line(err)
    finally:
        for p in paths: p.chmod(0o755 if p.is_dir() else 0o644)


class FullDisk:
    "The disk fills up while a file named `name` is written through `ptm_nb.io.atomic_write` (ENOSPC)."
    def __init__(self, monkeypatch, name: str):
        real = os.fdopen
        def fdopen(fd, *args, **kw):
            f = real(fd, *args, **kw)
            target = os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))
            return _Full(f) if target.startswith(f'.{name}.') else f
        monkeypatch.setattr(ptm_nb.io.os, 'fdopen', fdopen)


class _Full:
    "A file on a full disk: every write fails with ENOSPC."
    def __init__(self, f): self.f = f
    def write(self, data): raise OSError(errno.ENOSPC, 'No space left on device')
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()


def test_a_full_disk_is_one_line_and_loses_nothing(finished, tmp_path, data_dir, capsys, monkeypatch):
    if not Path('/proc/self/fd').is_dir(): pytest.skip('needs /proc/self/fd (Linux): which file is written')
    root = tmp_path / 'root'; shutil.copytree(finished[0], root)
    before = files(root)
    with monkeypatch.context() as m:
        FullDisk(m, 'synset.pt')
        rc, _, err = cli(capsys, 'distill', '--method', 'random', '--ipc', '1', '--root', root, '--data-root',
                         data_dir, *SMOKE)
    line = one_line(err)
    spec = RunSpec('random', 'breastmnist', 1, 'smoke', device='cpu')
    folder = root / 'runs' / run_id(spec.resolve())
    assert rc == 2 and line.startswith(f'ptm-nb distill: error: {folder / "synset.pt"}: No space left on '
                                       'device. Fix: free space on that disk'), line
    assert files(root) == before                             # the finished run as it was, no folder half-made
    assert not folder.exists() and not list(root.rglob('*.part'))
    rc, out, err = cli(capsys, 'distill', '--method', 'random', '--ipc', '1', '--root', root, '--data-root',
                       data_dir, *SMOKE)
    assert rc == 0 and (folder / 'eval.json').exists(), err  # space again: it runs


def test_a_full_disk_at_the_end_of_a_distillation_keeps_its_checkpoint(tmp_path, data_dir, capsys,
                                                                        monkeypatch):
    "The set was distilled when the disk filled: its checkpoint stays, and the run resumes to the same set."
    if not Path('/proc/self/fd').is_dir(): pytest.skip('needs /proc/self/fd (Linux): which file is written')
    args = ['distill', '--method', 'mtt', '--data-root', data_dir, *SMOKE]
    with monkeypatch.context() as m:
        FullDisk(m, 'synset.pt')
        rc, _, err = cli(capsys, *args, '--root', tmp_path / 'full')
    assert rc == 2 and 'synset.pt: No space left on device' in one_line(err)
    [folder] = (tmp_path / 'full' / 'runs').iterdir()
    kept = {p.name for p in folder.iterdir()}
    assert {'config.json', 'checkpoint.pt', 'metrics.jsonl'} <= kept and 'synset.pt' not in kept, kept
    assert ptm_nb.io.read_tensors(folder / 'checkpoint.pt')['state']['iteration'] == 4   # whole, as recorded
    assert not list(folder.rglob('*.part'))
    rc, _, err = cli(capsys, *args, '--root', tmp_path / 'full')
    assert rc == 0, err
    rc, _, err = cli(capsys, *args, '--root', tmp_path / 'whole')
    assert rc == 0, err
    a, b = (torch.load(tmp_path / r / 'runs' / folder.name / 'synset.pt', weights_only=True)
            for r in ('full', 'whole'))
    assert torch.equal(a['images'], b['images']) and a['lr'] == b['lr']


def test_a_folder_where_an_output_file_should_be(tmp_path, data_dir, capsys):
    out = tmp_path / 'table.csv'; out.mkdir()
    rc, stdout, err = cli(capsys, 'datasets', '--root', data_dir, '--out', out)
    line = one_line(err, 'datasets')
    assert rc == 2 and line.startswith(f'ptm-nb datasets: error: {out}: Is a directory. Fix: a folder stands '
                                       'where a file should be: move or delete that folder'), line
    assert out.is_dir() and not any(out.iterdir()) and not list(tmp_path.glob('.table.csv.*'))


# ------------------------------------------------------------------------------------------------------------
# run folders: none left by a run that could not start, and a run that waits says so

def test_a_run_that_fails_before_its_first_result_leaves_no_folder(tmp_path, data_dir, capsys, monkeypatch):
    rc, _, err = cli(capsys, 'distill', '--method', 'random', '--dataset', 'nosuchset', '--root', tmp_path,
                     *SMOKE)
    assert rc == 2 and "unknown dataset 'nosuchset'" in err and not (tmp_path / 'runs').exists()
    import ptm_nb.runs
    def broken(*args, **kw): raise RuntimeError('the experts could not be trained')
    monkeypatch.setattr(ptm_nb.runs, 'experts_for', broken)
    with pytest.raises(RuntimeError, match='could not be trained'):
        run(RunSpec('mtt', 'breastmnist', 2, 'smoke', device='cpu'), root=tmp_path, data_root=data_dir,
            progress=False)
    assert list((tmp_path / 'runs').iterdir()) == []


def test_a_run_waiting_for_another_process_says_what_it_waits_for(tmp_path, data_dir, capsys):
    spec = RunSpec('random', 'breastmnist', 2, 'smoke', device='cpu')
    lock = tmp_path / 'runs' / run_id(spec.resolve()) / '.lock'
    code = ('import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); '
            'print("held", flush=True); time.sleep(2)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        t0 = time.time()
        res = run(spec, root=tmp_path, data_root=data_dir, progress=False)
        assert time.time() - t0 > 0.5 and res.eval['nets'] == 2
    finally: holder.wait(30)
    err = capsys.readouterr().err
    assert err.count('waiting for ') == 1
    assert (f'waiting for run {lock.parent.name} (another process is computing it; then it is read back): '
            f'another process holds {lock}\n') in err


# ------------------------------------------------------------------------------------------------------------
# the outputs index

def test_the_index_marks_a_notebook_whose_last_run_failed(tmp_path, monkeypatch):
    "`reproduce` with papermill stood in for: a success, then a failure (marked), then a success (unmarked)."
    import papermill
    from ptm_nb.report import reproduce
    state = {'fail': False}
    def execute(src, out, parameters=None, **kw):
        name, nb_dir = Path(src).stem, Path(out).parent
        Path(out).write_text('{}')
        if state['fail']: raise RuntimeError('the notebook raised\nValueError: no data')
        (nb_dir.parent / 'tables').mkdir(exist_ok=True)
        (nb_dir.parent / 'tables' / f'{name}.md').write_text('## Table 1\n\n| a |\n|---|\n| 42 |\n')
        record = {'notebook': name, 'scale': 'smoke', 'parameters': {}, 'datasets': [], 'absent': [],
                  'inputs': {}, 'files': [f'tables/{name}.md'], 'device': 'cpu', 'seconds': 1.0,
                  'finished': 'earlier',
                  'preset': {'net_options': {}, 'experts': {}, 'eval': {}, 'methods': {}}}
        (nb_dir / f'{name}.json').write_text(json.dumps(record))
    monkeypatch.setattr(papermill, 'execute_notebook', execute)
    quiet = dict(scale='smoke', only='table1', out=tmp_path, progress=False, log=lambda *a: None, force=True)
    index = tmp_path / 'smoke' / 'README.md'
    assert [s['status'] for s in reproduce(**quiet)] == ['done'] and 'failed' not in index.read_text()
    state['fail'] = True
    assert [s['status'] for s in reproduce(**quiet)] == ['failed']
    text = index.read_text()
    assert '**Failed at their last run**: table1_datasets' in text
    assert '## table1_datasets (last run failed)' in text and '**Last run failed** on ' in text
    assert 'ValueError: no data. The tables and figures below are from its' in text
    assert '| 42 |' in text and '(notebooks/table1_datasets.failed.ipynb)' in text   # the old table, marked
    state['fail'] = False
    assert [s['status'] for s in reproduce(**quiet)] == ['done']
    assert 'failed' not in index.read_text()
    assert not list((tmp_path / 'smoke' / 'notebooks').glob('*.failed.*'))


def test_the_index_marks_a_notebook_that_failed_in_its_kernel(tmp_path, data_dir):
    "Through papermill: Table 1 with a data root that holds nothing fails in its kernel, and is marked."
    empty = tmp_path / 'empty'; empty.mkdir()
    command = [str(Path(sys.executable).parent / 'ptm-nb'), 'reproduce', '--scale', 'smoke', '--only',
               'table1', '--out', str(tmp_path / 'out'), '--data-root', str(empty), '--no-progress']
    r = subprocess.run(command, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1 and 'table1_datasets' in r.stderr, r.stderr
    assert 'no dataset is present' in r.stderr
    nb = tmp_path / 'out' / 'smoke' / 'notebooks'
    assert (nb / 'table1_datasets.failed.ipynb').exists() and not (nb / 'table1_datasets.ipynb').exists()
    assert json.loads((nb / 'table1_datasets.failed.json').read_text())['error'].startswith('AssertionError')
    text = (tmp_path / 'out' / 'smoke' / 'README.md').read_text()
    assert '## table1_datasets (last run failed)' in text and 'No result of it yet' in text


def test_a_full_disk_while_logging_names_the_metrics_file(tmp_path, data_dir, capsys, monkeypatch):
    "A write() that fails names no file: the run's log line names metrics.jsonl, and the fix."
    import builtins
    real_open = builtins.open
    def full_open(path, mode='r', *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return _Full(f) if str(path).endswith('metrics.jsonl') and 'a' in mode else f
    with monkeypatch.context() as m:
        m.setattr(builtins, 'open', full_open)
        rc, _, err = cli(capsys, 'distill', '--method', 'mtt', '--root', tmp_path, '--data-root', data_dir, *SMOKE)
    line = one_line(err)
    [folder] = (tmp_path / 'runs').iterdir()
    assert rc == 2 and line.startswith(f'ptm-nb distill: error: {folder / "metrics.jsonl"}: No space left on '
                                       'device. Fix: free space on that disk'), line
    rc, _, err = cli(capsys, 'distill', '--method', 'mtt', '--root', tmp_path, '--data-root', data_dir, *SMOKE)
    assert rc == 0 and (folder / 'synset.pt').exists(), err          # space again: it runs to the end


def test_experts_too_short_for_the_window_fail_before_any_expert_trains(tmp_path, data_dir, capsys):
    rc, _, err = cli(capsys, 'distill', '--method', 'mtt', '--root', tmp_path / 'out', '--data-root', data_dir,
                     *SMOKE, '--set', 'experts.epochs=1')
    assert rc == 2 and ('its windows read expert epochs up to 2, and its experts are 1 epochs long: '
                        '--set experts.epochs=2') in one_line(err), err
    assert not (tmp_path / 'out').exists()                      # nothing trained, nothing written
