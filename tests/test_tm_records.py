"""The trajectory-matching methods at smoke scale against records made before the matching step was refactored
into `tm_step` and hooks (tests/records/tm_smoke.pt): the same run ids, the same synthetic sets and the same
evaluations. On the machine that made the records they are equal bit for bit (torch.equal); on another CPU the
kernels round differently and 100 updates at a large lr_img carry that noise into the images (measured on a Xeon
against the records made on an EPYC: at most 1.3e-3 of the images' norm, 0.04 of pixels up to 7 in size), so the
test allows 5e-3 of the norm (a changed algorithm moves the set by O(1) of it) and one flipped test prediction per
net (1/156 on BreastMNIST's test split)."""
import pytest
import torch
from pathlib import Path
from ptm_nb.data import load_dataset
from ptm_nb.runs import RunSpec, run

RECORDS = torch.load(Path(__file__).parent / 'records' / 'tm_smoke.pt', weights_only=True)
CASES = {'mtt': 2, 'mtt_backend': 2, 'ftd': 2, 'smdd': 2, 'ptm': 2, 'datm': 2, 'seqmatch': 2, 'haba': 2,
         'ptm4': 4, 'datm3': 3, 'ftd3': 3}

pytestmark = pytest.mark.usefixtures('one_thread')   # see conftest.py


@pytest.mark.parametrize('case', list(CASES))
def test_same_id_set_and_evaluation_as_before_the_refactor(case, tmp_path):
    method, ipc = case.rstrip('0123456789'), CASES[case]
    want = RECORDS[case]
    r = run(RunSpec(method, 'breastmnist', ipc, 'smoke', 0 if ipc == 2 else 1, 'cpu'), root=tmp_path, progress=False)
    assert r.folder.path.name == want['id']
    s = r.synset
    assert s.images.shape == want['images'].shape
    assert torch.allclose(s.labels.float(), want['labels'].float(), atol=1e-3)
    rel = float((s.images - want['images']).norm() / want['images'].norm())
    assert rel <= 5e-3, rel
    assert abs(s.lr - want['lr']) <= 1e-3 * abs(want['lr'])
    one_flip = 1 / len(load_dataset('breastmnist').test_y) + 1e-9  # one test prediction of the split (156)
    assert all(abs(a - b) <= one_flip for a, b in zip(r.eval['accs'], want['accs'])), (r.eval['accs'], want['accs'])
