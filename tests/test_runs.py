"""Runs share expert buffers through one lock per buffer: runs that need the same experts take turns, runs on
different buffers do not wait for each other. A run killed while it evaluates resumes its evaluation."""
import threading, time
from ptm_nb.data import load_dataset, limit_train
from ptm_nb.io import file_lock
from ptm_nb.experts import expert_folder
from ptm_nb.runs import RunSpec, experts_for, expert_config
from ptm_nb.train import results_of


def test_experts_are_locked_one_by_one(tmp_path, data_dir):
    "An expert another process trains is waited for (then read, not trained again); another buffer's is not."
    ds = limit_train(load_dataset('breastmnist', root=data_dir), 8)
    plain, flat = (RunSpec(m, 'breastmnist', 2, 'smoke').resolve() for m in ('mtt', 'ftd'))
    for c in (plain, flat): c['experts'].update(n_experts=1, epochs=1)
    lock = lambda cfg: expert_folder(ds, expert_config(cfg, 'cpu'), tmp_path / 'experts') / '.expert_000.lock'
    assert lock(plain) != lock(flat)
    done = {}
    def make(name, cfg): done[name] = experts_for(ds, cfg, tmp_path, 'cpu', progress=False)
    with file_lock(lock(plain)):                       # another process holds the plain buffer's expert
        threads = {n: threading.Thread(target=make, args=(n, c)) for n, c in (('plain', plain), ('flat', flat))}
        for t in threads.values(): t.start()
        threads['flat'].join(300)
        assert 'flat' in done and len(done['flat']) == 1   # the flat buffer did not wait
        time.sleep(0.5)
        assert 'plain' not in done                          # the held one waits its turn
    threads['plain'].join(300)
    assert 'plain' in done and len(done['plain']) == 1
    assert done['plain'].folder != done['flat'].folder


def test_a_killed_evaluation_resumes_to_the_same_numbers(tmp_path, data_dir, monkeypatch):
    import pytest, torch
    import ptm_nb.train as train
    from ptm_nb.runs import run
    ds = load_dataset('breastmnist', root=data_dir)
    spec = RunSpec('random', 'breastmnist', 2, 'smoke', device='cpu')
    whole = run(spec, root=tmp_path / 'whole', dataset=ds, progress=False)
    monkeypatch.setattr(train, 'EVAL_CHECKPOINT_EVERY_S', 0.)          # save after every epoch
    lr_at = train.TrainConfig.lr_at
    def killed_at_epoch_4(self, epoch):
        if epoch == 4: raise KeyboardInterrupt('simulated kill')
        return lr_at(self, epoch)
    monkeypatch.setattr(train.TrainConfig, 'lr_at', killed_at_epoch_4)
    with pytest.raises(KeyboardInterrupt): run(spec, root=tmp_path / 'killed', dataset=ds, progress=False)
    [ckpt] = (tmp_path / 'killed').glob('runs/*/eval_checkpoint.pt')
    assert torch.load(ckpt, weights_only=False)['epoch'] == 4 and not (ckpt.parent / 'eval.json').exists()
    def from_epoch_4_on(self, epoch):                                    # a restart would visit epoch 0 again
        if epoch < 4: raise AssertionError(f'the evaluation started over (epoch {epoch})')
        return lr_at(self, epoch)
    monkeypatch.setattr(train.TrainConfig, 'lr_at', from_epoch_4_on)
    resumed = run(spec, root=tmp_path / 'killed', dataset=ds, progress=False)
    assert results_of(resumed.eval) == results_of(whole.eval) and resumed.eval['epochs'] > 4 and not ckpt.exists()
    assert resumed.eval['seconds'] > 0


def test_one_evaluation_lr_rule():
    """The lr an evaluation trains with is `eval_lr`'s: the set's own lr for a method that learns one, else
    0.01; no other module of the package spells the rule out."""
    import re
    from pathlib import Path
    import torch
    import ptm_nb
    from ptm_nb.distill import METHODS, SyntheticSet
    from ptm_nb.runs import EVAL_LR, eval_lr
    s = SyntheticSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 0.03, 2, 1)
    assert EVAL_LR == 0.01 and {n: eval_lr(n, s) for n in METHODS} == {
        n: 0.03 if m.learned_lr else 0.01 for n, m in METHODS.items()}
    rule = re.compile(r'learned_lr\s+else\s+0\.01')
    package = Path(ptm_nb.__file__).parent
    spelled = [p.name for p in package.rglob('*.py') if rule.search(p.read_text(encoding='utf-8'))]
    assert not spelled, spelled
