"""Shared fixtures. Real data comes from PTM_DATA_DIR (test.sh points it at ../shared/data/medmnist when present);
a test that needs a file that is absent is skipped with the reason printed (pytest -rs), never passed silently."""
import os
from pathlib import Path
import pytest
import torch


def _data_dir():
    d = os.environ.get('PTM_DATA_DIR')
    if d: return Path(d)
    here = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data' / 'medmnist'
    return here.resolve() if here.is_dir() else None


@pytest.fixture(scope='session')
def data_dir():
    d = _data_dir()
    if d is None or not d.is_dir(): pytest.skip('real data absent: set PTM_DATA_DIR to the MedMNIST folder')
    return d


@pytest.fixture
def need_file(data_dir):
    "Return a function that gives the path of a real data file or skips the test, naming the file."
    def _need(rel):
        p = (data_dir / rel).resolve()
        if not p.exists(): pytest.skip(f'real data file absent: {p}')
        return p
    return _need


@pytest.fixture
def one_thread():
    """Tiny networks and float64 checks run far faster on one thread when the cores are shared (measured: 10x on a
    loaded 2-core machine); the thread count is restored afterwards. Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
