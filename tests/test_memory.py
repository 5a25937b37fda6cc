"""`keep_freed_memory`: with Dask's worker environment (MALLOC_TRIM_THRESHOLD_=65536) every freed tensor above
128 KB goes back to the kernel and its next allocation page-faults anew; after the call the heap keeps it."""
import os, subprocess, sys, textwrap
import pytest

PROBE = textwrap.dedent('''
    import resource, sys, torch
    from ptm_nb.engines import keep_freed_memory
    if sys.argv[1] == 'keep': assert keep_freed_memory()
    def faults(n=40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n): torch.empty(1 << 20).fill_(1.0)          # 4 MB, allocated and freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults(2)
    print(faults())
''')

def _faults(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}   # (a cluster may have set some)
    env['MALLOC_TRIM_THRESHOLD_'] = '65536'                     # what a Dask nanny gives its workers
    out = subprocess.run([sys.executable, '-c', PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_freed_tensors_are_reused_not_refaulted():
    as_dask, kept = _faults('as_is'), _faults('keep')
    pages = 40 * (4 << 20) // 4096                                  # every page of every allocation
    assert as_dask > pages // 2, as_dask                            # each 4 MB block faults in afresh
    assert kept < pages // 5, kept                                  # reused from the heap (measured: none)

def test_returns_false_where_not_glibc(monkeypatch):
    from ptm_nb import engines
    monkeypatch.setattr(engines.sys, 'platform', 'darwin')
    assert engines.keep_freed_memory() is False

def _malloc_env():
    import os
    return {k: os.environ.get(k) for k in ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')}

def test_embedded_cluster_workers_start_with_the_allocator_settings():
    from ptm_nb.engines import MALLOC_ENV
    from ptm_nb.grid import _dask_client
    cluster, client = _dask_client({}, None, 1)
    try: seen = list(client.run(_malloc_env).values())
    finally: client.close(); cluster.close()
    assert seen == [{k: MALLOC_ENV[k] for k in seen[0]}]         # not the nanny's MALLOC_TRIM_THRESHOLD_=65536

def test_readme_gives_hand_started_workers_the_same_settings():
    from pathlib import Path
    from ptm_nb.engines import MALLOC_ENV
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    assert all(f'{k}={v}' in readme for k, v in MALLOC_ENV.items())

def test_a_nanny_started_before_does_not_undo_them(monkeypatch):
    "A nanny reads os.environ before its config; one started earlier in this process leaves 65536 there."
    from ptm_nb.engines import MALLOC_ENV
    from ptm_nb.grid import _dask_client
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '65536')
    cluster, client = _dask_client({}, None, 1)
    try: seen = list(client.run(_malloc_env).values())
    finally: client.close(); cluster.close()
    assert seen[0]['MALLOC_TRIM_THRESHOLD_'] == MALLOC_ENV['MALLOC_TRIM_THRESHOLD_']
