"""The task graph: buffers once, before the runs that read them; the embedded LocalCluster gives the same
synthetic sets as one process; a failing task is named at the end while the rest of the graph completes."""
import pytest
import torch
from ptm_nb.grid import plan, run_grid, Task
from ptm_nb.runs import RunSpec, run_id
from ptm_nb.distill import SyntheticSet


def _specs():
    return [RunSpec(m, 'breastmnist', 1, 'smoke', seed=s, device='cpu') for m in ('mtt', 'ptm') for s in (0, 1)]


def test_plan_holds_each_buffer_once_before_its_runs(tmp_path, data_dir):
    tasks = plan(_specs() + _specs()[:1], tmp_path)
    kinds = [t.kind for t in tasks.values()]
    assert kinds == ['expert'] * 2 + ['experts'] + ['run'] * 4               # smoke buffers hold 2 experts
    buffer = next(k for k, t in tasks.items() if t.kind == 'experts')
    experts = [k for k, t in tasks.items() if t.kind == 'expert']
    assert tasks[buffer].deps == tuple(experts) and [tasks[k].indices for k in experts] == [(0,), (1,)]
    assert all(t.deps == (buffer,) for t in tasks.values() if t.kind == 'run')
    assert set(tasks) - {buffer, *experts} == {run_id(s.resolve()) for s in _specs()}


def test_a_committed_meta_without_its_experts_plans_them_again(tmp_path, data_dir):
    # a clone holds a buffer's meta.json (its record) but not the expert files: each absent one is a task again
    from ptm_nb.io import write_json_atomic
    buffer = next(k for k, t in plan(_specs(), tmp_path).items() if t.kind == 'experts')
    folder = tmp_path / 'experts' / buffer
    folder.mkdir(parents=True)
    write_json_atomic(folder / 'meta.json', {'experts': {'0': {}, '1': {}}})
    (folder / 'expert_001.pt').write_bytes(b'')
    tasks = plan(_specs(), tmp_path)
    assert [t.indices for t in tasks.values() if t.kind == 'expert'] == [(0,)]


def test_a_task_is_submitted_once_what_it_waits_for_is_done(tmp_path, data_dir):
    # a task handed to Dask with its dependency is placed on the worker holding that dependency's result, one
    # handed early on some worker's queue: so each goes to Dask only when it can start and a worker is free
    from ptm_nb.grid import _release, GridResult
    tasks = plan(_specs(), tmp_path)
    bar = type('Bar', (), {'update': lambda self: None})()
    def start():
        waiting, out, sent = dict(tasks), GridResult(), []
        release = lambda: _release(waiting, tasks, out, bar, lambda t, p: sent.append((t.key, p)))
        release()
        return waiting, out, sent, release
    waiting, out, sent, release = start()
    kinds = lambda: [tasks[k].kind for k, _ in sent]
    assert kinds() == ['expert', 'expert']                                # the runs wait for their buffer
    out.done.update({k: {} for k, _ in sent}); release()
    assert kinds() == ['expert', 'expert', 'experts']
    out.done[sent[-1][0]] = {}; release()
    assert kinds() == ['expert', 'expert', 'experts'] + ['run'] * 4 and not waiting
    assert [p for _, p in sent] == sorted((p for _, p in sent), reverse=True)   # plan order first
    waiting, sent = dict(tasks), []
    _release(waiting, tasks, GridResult(), bar, lambda t, p: sent.append((t.key, p)), room=1)   # one free worker
    assert [tasks[k].kind for k, _ in sent] == ['expert'] and len(waiting) == len(tasks) - 1
    waiting, out, sent, release = start()
    out.failed[sent[0][0]] = 'boom'; out.done[sent[1][0]] = {}; release()    # one expert failed
    assert len(sent) == 2 and not waiting                                 # nothing after it is sent
    assert all(out.failed[k].startswith('skipped') for k, t in tasks.items() if t.kind in ('experts', 'run'))


def test_local_cluster_gives_the_sets_of_one_process(tmp_path, data_dir):
    pytest.importorskip('distributed')
    one = run_grid(plan(_specs(), tmp_path / 'one'), tmp_path / 'one', workers=0, progress=False)
    two = run_grid(plan(_specs(), tmp_path / 'two'), tmp_path / 'two', workers=2, progress=False)
    assert not one.failed and not two.failed, (one.failed, two.failed)
    assert set(one.done) == set(two.done) and len(one.done) == 7
    for s in _specs():
        rid = run_id(s.resolve())
        a = SyntheticSet.load(tmp_path / 'one' / 'runs' / rid / 'synset.pt')
        b = SyntheticSet.load(tmp_path / 'two' / 'runs' / rid / 'synset.pt')
        assert torch.equal(a.images, b.images) and a.lr == b.lr          # both single-threaded: bit-identical
    assert plan(_specs(), tmp_path / 'two') == {}                        # nothing left to do


@pytest.mark.parametrize('workers', [0, 2])
def test_a_failing_task_is_named_and_the_rest_completes(tmp_path, data_dir, workers):
    pytest.importorskip('distributed')
    good = RunSpec('random', 'breastmnist', 1, 'smoke', device='cpu')
    bad = RunSpec('random', 'breastmnist', 10_000, 'smoke', device='cpu')     # more images per class than exist
    tasks = plan([bad, good], tmp_path)
    out = run_grid(tasks, tmp_path, workers=workers, retries=0, progress=False)
    bad_id, good_id = run_id(bad.resolve()), run_id(good.resolve())
    assert good_id in out.done and bad_id in out.failed
    assert 'ipc' in out.failed[bad_id]
    with pytest.raises(RuntimeError, match=bad_id): out.raise_failures()


def test_a_given_scheduler_runs_the_graph(tmp_path, data_dir, monkeypatch):
    "`scheduler=` (or $PTM_SCHEDULER) sends the graph to a running cluster, here one started by the test."
    distributed = pytest.importorskip('distributed')
    specs = _specs()[:2]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=':0') as cluster:
        monkeypatch.setenv('PTM_SCHEDULER', cluster.scheduler_address)
        out = run_grid(plan(specs, tmp_path), tmp_path, progress=False)
        assert not out.failed and len(out.done) == 5
    assert plan(specs, tmp_path) == {}


def test_a_killed_worker_changes_nothing(tmp_path, data_dir):
    """A worker process killed (SIGKILL) in the middle of a run: the cluster starts a new one, the run is done again
    from its last checkpoint, and the graph ends with the set of an undisturbed run, bit for bit."""
    import os, signal, threading, time
    distributed = pytest.importorskip('distributed')
    from ptm_nb.distill import RunFolder
    spec = RunSpec('mtt', 'breastmnist', 1, 'smoke', device='cpu', overrides={'iterations': 40, 'checkpoint_every': 3})
    rid = run_id(spec.resolve())
    calm = run_grid(plan([spec], tmp_path / 'calm'), tmp_path / 'calm', workers=0, progress=False)
    folder, killed = tmp_path / 'killed' / 'runs' / rid, []
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=':0') as cluster, \
            distributed.Client(cluster) as client:
        def kill_after_first_checkpoint():
            while not (folder / 'checkpoint.pt').exists(): time.sleep(0.01)
            finished_before = (folder / 'synset.pt').exists()
            for pid in client.run(os.getpid).values(): os.kill(pid, signal.SIGKILL)
            killed.append(finished_before)
        watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        watcher.start()
        out = run_grid(plan([spec], tmp_path / 'killed'), tmp_path / 'killed', scheduler=cluster.scheduler_address,
                       progress=False)
        watcher.join(timeout=10)
    assert killed == [False] and not calm.failed and not out.failed, (killed, out.failed)   # killed mid-run
    assert RunFolder(folder).load_checkpoint() is not None and len(RunFolder(folder).metrics()) == 40
    assert [r['iteration'] for r in RunFolder(folder).metrics()] == list(range(1, 41))    # each iteration once
    a = SyntheticSet.load(tmp_path / 'calm' / 'runs' / rid / 'synset.pt')
    b = SyntheticSet.load(folder / 'synset.pt')
    assert torch.equal(a.images, b.images) and a.lr == b.lr


_TWICE = '''
import sys
import ptm_nb.experts as E
from ptm_nb.runs import RunSpec
from ptm_nb.grid import plan, run_grid
root, counter = sys.argv[1], sys.argv[2]
def counted(name):
    inner = getattr(E, name)
    def train(ds, cfg, which):
        n = len(which) if isinstance(which, (list, tuple, range)) else 1
        with open(counter, 'a') as f: f.write('x' * n)                       # one mark per expert trained
        return inner(ds, cfg, which)
    return train
E.train_expert, E.train_experts_stacked = counted('train_expert'), counted('train_experts_stacked')
specs = [RunSpec(m, 'breastmnist', 1, 'smoke', seed=s, device='cpu') for m in ('mtt', 'ptm') for s in (0, 1)]
out = run_grid(plan(specs, root), root, workers=0, progress=False)
out.raise_failures()
'''


def test_two_graphs_at_once_train_each_buffer_once(tmp_path, data_dir):
    "Two processes run the same grid on one outputs folder at the same time: each expert is trained once."
    import os, subprocess, sys
    from ptm_nb.experts import ExpertBuffer
    script, counter = tmp_path / 'twice.py', tmp_path / 'trained.txt'
    script.write_text(_TWICE)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / 'out'), str(counter)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    (folder,) = [p for p in (tmp_path / 'out' / 'experts').iterdir() if p.is_dir()]
    assert counter.read_text() == 'x' * len(ExpertBuffer(folder))                # each expert once, not twice
    assert len(list((tmp_path / 'out' / 'runs').iterdir())) == 4
