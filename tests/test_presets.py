"""The presets resolve as the benchmark states them: PTM's last stage is the end of the experts' trajectory, one
image-update budget across methods, flat experts for every trajectory-matching row, expert batches and 3D caps
that follow the data, and a sweep that reads the validation split only with the same effort for every method."""
import copy
import pandas as pd
import pytest
from ptm_nb.runs import RunSpec, load_hparams, expert_batch, expert_config, scale_for, check_config, METHODS
from ptm_nb.tuning import sweep_config, sweep_specs, choose, check_preset, grid_points

TM = [m for m in ('mtt', 'ftd', 'smdd', 'haba', 'datm', 'ptm') if m in METHODS]


@pytest.mark.parametrize('scale', ['smoke', 'quick', 'paper'])
def test_ptm_last_stage_is_the_end_of_the_trajectory(scale):
    cfg = RunSpec('ptm', 'pathmnist_subset1000', 2, scale).resolve()
    assert cfg['hp']['schedule'] == 'progressive'
    assert cfg['hp']['max_target_epoch'] == cfg['experts']['epochs']


def test_an_explicit_ptm_end_point_is_kept():
    cfg = RunSpec('ptm', 'pathmnist_subset1000', 2, 'quick', overrides={'max_target_epoch': 4}).resolve()
    assert cfg['hp']['max_target_epoch'] == 4


@pytest.mark.parametrize('ipc', [2, 10])
def test_one_budget_across_the_trajectory_matching_methods(ipc):
    iters = {m: RunSpec(m, 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']['iterations'] for m in TM}
    seq = RunSpec('seqmatch', 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']
    iters['seqmatch (all subsets)'] = seq['iterations'] * seq['n_subsets']
    assert len(set(iters.values())) == 1, iters
    # the other families are stated in the same currency: 100 image updates at ipc 2
    budget = next(iter(iters.values()))
    assert RunSpec('dm', 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']['iterations'] == budget
    for m in ('dc', 'dsa'):
        assert RunSpec(m, 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']['iterations'] == budget
    cafe = RunSpec('cafe', 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']
    assert cafe['iterations'] * cafe['max_outer'] == budget


def test_quick_ptm_overlap_weight_per_pair_is_the_same_at_ipc_2_and_10():
    "Eq. 4 sums over a class's |F|·|C| pairs (1 at ipc 2, 25 at ipc 10): the quick β2 keeps β2 × L_overlap level."
    import torch
    from ptm_nb.ptm import overlap_loss
    beta = {ipc: RunSpec('ptm', 'pathmnist_subset1000', ipc, 'quick').resolve()['hp']['beta_overlap']
            for ipc in (2, 10)}
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)   # 3 classes' two halves
    ipc2 = torch.stack([a, b], 1).reshape(6, 1, 8, 8)
    # the same two images per class, each half repeated 5 times: the kernel means of Eq. 4 are unchanged
    ipc10 = torch.cat([a.unsqueeze(1).expand(3, 5, 1, 8, 8), b.unsqueeze(1).expand(3, 5, 1, 8, 8)], 1)
    l2, l10 = (float(overlap_loss(x, 3, ipc, sigma=4.0)) for x, ipc in ((ipc2, 2), (ipc10.reshape(30, 1, 8, 8), 10)))
    assert l2 < 0 and l10 == pytest.approx(25 * l2, rel=1e-5)
    assert beta[10] * l10 == pytest.approx(beta[2] * l2, rel=1e-5)
    # the paper preset keeps the paper's one β2
    assert len({RunSpec('ptm', 'pathmnist', ipc, 'paper').resolve()['hp']['beta_overlap'] for ipc in (2, 10)}) == 1


@pytest.mark.parametrize('scale', ['quick', 'paper'])
def test_every_trajectory_matching_row_uses_flat_experts_and_plain_is_the_ablation(scale):
    for m in TM + ['seqmatch']:
        assert RunSpec(m, 'pathmnist_subset1000', 2, scale).resolve()['experts']['kind'] == 'flat', m
    plain = RunSpec('ptm', 'pathmnist_subset1000', 2, scale, overrides={'experts.kind': 'plain'}).resolve()
    assert plain['experts']['kind'] == 'plain'


@pytest.mark.parametrize('dataset', ['pathmnist_subset1000', 'adrenalmnist3d'])
def test_mtt_start_window_covers_the_front_half_of_the_quick_experts(dataset):
    cfg = RunSpec('mtt', dataset, 2, 'quick').resolve()
    assert cfg['hp']['max_start_epoch'] == cfg['experts']['epochs'] // 2


@pytest.mark.parametrize('scale', ['smoke', 'quick', 'paper'])
@pytest.mark.parametrize('dataset', ['pathmnist_subset1000', 'breastmnist', 'adrenalmnist3d'])
def test_every_trajectory_matching_run_finds_the_epochs_it_reads(scale, dataset):
    "No preset asks for an expert epoch its experts do not have (a run would stop at its first iteration)."
    from ptm_nb.distill import TMConfig, TM_HOOKS, tm_parts, epochs_needed
    from ptm_nb.baselines.datm import datm_config
    for m in TM + ['seqmatch']:
        cfg = RunSpec(m, dataset, 2, scale).resolve()
        if m == 'datm': tm, hooks = datm_config(cfg['hp'])[:2]
        elif m in TM_HOOKS: tm, hooks = tm_parts(m, cfg['hp'])[:2]
        else: tm, hooks = TMConfig(**{k: v for k, v in cfg['hp'].items() if k in TMConfig.__dataclass_fields__}), []
        assert epochs_needed(tm, hooks) <= cfg['experts']['epochs'], (m, dataset, scale)
        check_config(cfg)                   # SeqMatch's later subsets train their own experts: long enough too


def test_seqmatch_stage_experts_shorter_than_its_window_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r'up to 6.*5 epochs long.*stage_expert_epochs=6'):
        RunSpec('seqmatch', 'pathmnist_subset1000', 2, 'quick', overrides={'stage_expert_epochs': 5}).resolve()


def test_expert_batch_follows_the_data():
    cfg = RunSpec('mtt', 'pathmnist_subset1000', 2, 'quick').resolve()
    steps = cfg['experts']['steps_per_epoch']
    for n_train in (546, 701, 4708, 89996):
        b = expert_config(cfg, 'cpu', n_train).batch
        assert b == min(256, n_train // steps)
        assert -(-n_train // b) >= min(steps, -(-n_train // 256))     # at least `steps` SGD steps an epoch
    assert expert_batch({'batch': 64, 'steps_per_epoch': 40}, 701) == 64          # an explicit batch wins
    assert expert_batch({}, 701) == 256                                           # MTT's default
    with pytest.raises(ValueError, match='n_train'): expert_config(cfg, 'cpu')


def test_3d_caps_follow_the_shape_not_the_name():
    for name in ('adrenalmnist3d', 'vesselmnist3d', 'nodulemnist3d', 'organmnist3d'):
        cfg = RunSpec('ptm', name, 2, 'quick').resolve()
        assert cfg['net_options']['width'] == 32, name
        assert cfg['hp']['max_target_epoch'] == cfg['experts']['epochs'] == 6
    assert RunSpec('ptm', 'pneumoniamnist', 2, 'quick').resolve()['net_options']['width'] == 128


def test_the_sweep_gives_every_method_the_same_effort():
    for scale in ('smoke', 'quick', 'paper'):          # every scale that reproduce runs has its sweep
        specs = sweep_specs(scale)
        counts = pd.Series([s.method for s in specs]).value_counts()
        assert counts.nunique() == 1 and 'ptm' in counts
    hp = copy.deepcopy(load_hparams())
    hp['tuning']['quick']['grid']['ptm'] = {'lr_img': [1, 10, 100]}
    with pytest.raises(ValueError, match='different numbers of points'): sweep_config('quick', hp)


def test_the_choice_reads_the_validation_split_only():
    table = pd.DataFrame({'method': ['ptm', 'ptm'], 'lr_img': [10, 100], 'val_acc_mean': [0.2, 0.6],
                          'run': ['a', 'b'], 'finished': True})
    assert choose(table) == {'ptm': {'lr_img': 100}}
    # the test accuracy must not be able to steer the choice: a table that carries it is refused
    with pytest.raises(ValueError, match='validation'): choose(table.assign(acc_mean=[0.9, 0.1]))
    assert grid_points({'b': [1, 2], 'a': [3]}) == [{'a': 3, 'b': 1}, {'a': 3, 'b': 2}]


def test_the_quick_preset_holds_the_values_recorded_as_chosen():
    "What tuning.quick.chosen records (the sweep's result, nbs/paper/tuning.ipynb) is what the preset runs."
    hp = load_hparams()
    chosen = hp['tuning']['quick'].get('chosen')
    if chosen is None: pytest.skip('the quick sweep has not recorded a choice yet')
    assert check_preset(chosen, 'quick', hp) == []
