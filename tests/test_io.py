"""ptm_nb.io: the one atomic write, digest and lock. A file written atomically gets the mode the umask gives;
in a folder that keeps digests every file io writes has its sha256 in `digests.json`, a byte changed under the
same size and mtime is found before the file is parsed and set aside, a folder without digests (older records,
the committed quick runs in a fresh clone) reads as it is, and writers sharing a folder lose no entry."""
import json, os, shutil, stat, subprocess, sys, textwrap, warnings
from pathlib import Path
import pytest
import torch
from ptm_nb.io import (DIGESTS, CorruptFile, CorruptFileWarning, atomic_write, file_digest, file_lock,
                       read_json, read_or_quarantine, read_tensors, recorded_digest, track_digests,
                       write_json_atomic, write_text_atomic)

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **kw) -> subprocess.CompletedProcess:
    "Run `code` in a fresh interpreter that imports this checkout's ptm_nb."
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def flip_keeping_stamp(path: Path, at: int):
    "Flip the low bit of byte `at`, then give the file back its mtime: its size and mtime say nothing."
    st, raw = path.stat(), bytearray(path.read_bytes())
    raw[at] ^= 1
    path.write_bytes(bytes(raw)); os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def manifest(folder: Path) -> dict: return json.loads((folder / DIGESTS).read_text())


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_an_atomic_write_gets_the_mode_of_the_umask(tmp_path, umask):
    "mkstemp makes its file 0o600; the final file (and the digests.json beside it) are like any new file."
    r = python(f'''
        import os; os.umask({umask:#o})
        from pathlib import Path
        from ptm_nb.io import atomic_write, DIGESTS
        p = atomic_write(Path({str(tmp_path)!r}) / 'a.json', lambda f: f.write('{{}}'), 'w', digest=True)
        print(oct(os.stat(p).st_mode & 0o777), oct(os.stat(p.parent / DIGESTS).st_mode & 0o777))''')
    assert r.returncode == 0, r.stderr
    want = oct(0o666 & ~umask)
    assert r.stdout.split() == [want, want] and want != oct(0o600)


def test_a_changed_byte_is_found_under_the_same_size_and_mtime(tmp_path):
    run = tmp_path / 'run'; track_digests(run)
    ev = write_json_atomic(run / 'eval.json', {'acc_mean': 0.625, 'accs': [0.5, 0.75]})
    pt = atomic_write(run / 'synset.pt', lambda f: torch.save({'images': torch.arange(8.)}, f))
    assert manifest(run) == {'eval.json': file_digest(ev), 'synset.pt': file_digest(pt)}
    assert read_json(ev)['acc_mean'] == 0.625 and torch.equal(read_tensors(pt)['images'], torch.arange(8.))
    flip_keeping_stamp(ev, ev.read_bytes().index(b'0.625') + 4)                   # 0.625 -> 0.624: still JSON
    flip_keeping_stamp(pt, pt.read_bytes().index(torch.arange(8.).numpy().tobytes()) + 8)      # still loads
    assert json.loads(ev.read_text())['acc_mean'] == 0.624
    for path, read in ((ev, read_json), (pt, read_tensors)):
        with pytest.raises(CorruptFile) as e: read(path)
        assert str(e.value).startswith(f'{path}: its sha256 is ') and '\n' not in str(e.value)
        assert 'recorded in digests.json' in str(e.value)
        damaged = path.read_bytes()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter('always')
            assert read_or_quarantine(path, read, 'made again') is None
        [w] = seen
        assert w.category is CorruptFileWarning and str(w.message).startswith(f'{path}: its sha256 is ')
        assert not path.exists() and path.with_name(path.name + '.corrupt').read_bytes() == damaged
    again = write_json_atomic(run / 'eval.json', {'acc_mean': 0.625, 'accs': [0.5, 0.75]})    # redone
    assert read_json(again)['acc_mean'] == 0.625 and manifest(run) == {'eval.json': file_digest(again)}


def test_a_folder_without_digests_reads_as_it_is(tmp_path):
    "No digests.json (an older record): nothing to check against, so nothing is refused or written."
    ev = write_json_atomic(tmp_path / 'eval.json', {'acc_mean': 0.5})
    assert recorded_digest(ev) is None and read_json(ev) == {'acc_mean': 0.5}
    flip_keeping_stamp(ev, ev.read_bytes().index(b'0.5') + 2)
    assert read_json(ev) == {'acc_mean': 0.4}                     # not verified, and not an error either
    assert sorted(p.name for p in tmp_path.iterdir()) == ['eval.json']


def test_committed_quick_records_read_back_from_a_fresh_clone(tmp_path):
    """A clone gives every file a new mtime, and records written before digests were kept have no digests.json
    (those after have one, which lists files that are not committed, such as checkpoints): both read back as
    committed."""
    from ptm_nb.distill import RunFolder
    runs = sorted(p.parent for p in (ROOT / 'outputs' / 'quick' / 'runs').glob('*/eval.json'))
    if not runs: pytest.skip('no quick records committed')
    old, new = ([r for r in runs if (r / DIGESTS).exists() == kept] for kept in (False, True))
    for src in old[:2] + new[:2]:
        dst = tmp_path / src.name
        shutil.copytree(src, dst, copy_function=shutil.copy)       # copy: new mtimes, as a clone has
        assert all(p.stat().st_mtime_ns != q.stat().st_mtime_ns for p, q in zip(sorted(src.iterdir()),
                                                                               sorted(dst.iterdir())) if p.is_file())
        with warnings.catch_warnings():
            warnings.simplefilter('error')                         # no file is set aside
            f = RunFolder(dst)
            assert f.config == json.loads((src / 'config.json').read_text())
            assert f.load_eval() == json.loads((src / 'eval.json').read_text())
            committed = torch.load(src / 'synset.pt', weights_only=True)['images']
            assert torch.equal(f.load_synset().images, committed)
        assert (dst / DIGESTS).exists() == (src / DIGESTS).exists()    # reading writes nothing
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())


def test_digests_leave_out_logs_and_forget_files_that_are_gone(tmp_path):
    run = tmp_path / 'run'; track_digests(run)
    write_text_atomic(run / 'metrics.jsonl', '{"iteration": 1}\n')     # appended to in place afterwards
    ck = atomic_write(run / 'checkpoint.pt', lambda f: torch.save({'w': torch.ones(2)}, f))
    snap = atomic_write(run / 'snapshots' / 'iter_000002.pt', lambda f: torch.save({'w': torch.ones(2)}, f))
    assert manifest(run) == {'checkpoint.pt': file_digest(ck)}
    assert manifest(run / 'snapshots') == {'iter_000002.pt': file_digest(snap)}    # a subfolder: its own
    ck.unlink()
    ev = write_json_atomic(run / 'eval.json', {})
    assert manifest(run) == {'eval.json': file_digest(ev)}
    other = write_json_atomic(tmp_path / 'elsewhere' / 'a.json', {})
    assert not (other.parent / DIGESTS).exists() and recorded_digest(other) is None


WRITER = '''
    import sys, threading, hashlib
    from pathlib import Path
    from ptm_nb.io import write_text_atomic
    folder, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    def write(t):
        for i in range(n): write_text_atomic(folder / f'{tag}-{t}-{i}.txt', f'{tag} {t} {i}\\n' * (i + 1))
    threads = [threading.Thread(target=write, args=(t,)) for t in range(3)]
    for th in threads: th.start()
    for th in threads: th.join()
'''


def test_concurrent_writers_lose_no_digest(tmp_path):
    "Two processes of three threads each write into one folder: every file ends up in digests.json, rightly."
    folder = tmp_path / 'shared'; track_digests(folder)
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, '-c', textwrap.dedent(WRITER), str(folder), tag, '15'],
                              env=env, stderr=subprocess.PIPE, text=True) for tag in ('a', 'b')]
    for p in procs: assert p.wait(timeout=600) == 0, p.stderr.read()
    files = sorted(p.name for p in folder.glob('*.txt'))
    assert len(files) == 2 * 3 * 15
    assert manifest(folder) == {n: file_digest(folder / n) for n in files}
    assert not list(folder.glob('.*.part'))


def test_file_lock_is_held_across_processes(tmp_path):
    lock = tmp_path / 'locks' / 'run.lock'
    take = f'import filelock; filelock.FileLock({str(lock)!r}).acquire(timeout=0)'
    with file_lock(lock):
        assert python(take).returncode != 0            # another process cannot take it ...
    assert python(take).returncode == 0                # ... until it is let go
