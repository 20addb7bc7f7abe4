"Quickstart (few-shot digits): data split, pretraining, the four arms, paired statistics, the lr rule, the CLI end to end, caching and bad input."
import os, sys, json, math, re, stat, subprocess, dataclasses
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from so_tutorial.io import UserError
from so_tutorial.quickstart import (QuickstartConfig, make_split, sample_shots, load_digits_tensors, pretrain, load_or_pretrain,
                                    make_arm, adapt, FIGURES, build_model, add_lora, LoRALinear, mean_ci, ci_label, compare_arms,
                                    paired_differences, verdict, choose_lr, _grow, run_jobs, comparison_table)

TINY = QuickstartConfig(seeds=(1,), shots=(2,), steps=6, tune=False, pretrain_steps=60, eval_every=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def split(): return make_split(0)


@pytest.fixture(scope='module')
def pretrained(split):
    torch.manual_seed(0)
    model, acc = pretrain(TINY, split)
    return model.state_dict(), acc


def test_split_disjoint_complete_and_classes(split):
    _, y = load_digits_tensors()
    idx = {k: set(p.index.tolist()) for k, p in split.items()}
    names = list(idx)
    for i, a in enumerate(names):
        for b in names[i + 1:]: assert idx[a].isdisjoint(idx[b]), (a, b)
    assert set().union(*idx.values()) == set(range(1797))
    for k, digits in (('pretrain', range(5)), ('pretrain_test', range(5)), ('pool', range(5, 10)), ('test', range(5, 10))):
        assert set(y[split[k].index].tolist()) == set(digits)
        assert torch.equal(split[k].y, y[split[k].index] % 5) and set(split[k].y.tolist()) == set(range(5))
    # the test pool is about half of each class of 5-9
    for c in range(5):
        n_pool, n_test = int((split['pool'].y == c).sum()), int((split['test'].y == c).sum())
        assert abs(n_pool - n_test) <= 1


def test_split_deterministic(split):
    again, other = make_split(0), make_split(1)
    assert all(torch.equal(split[k].index, again[k].index) for k in split)
    assert not torch.equal(split['test'].index, other['test'].index)


@pytest.mark.parametrize('shots', [1, 2, 8])
def test_sample_shots(split, shots):
    y = split['pool'].y
    i = sample_shots(y, shots, seed=3)
    assert torch.equal(torch.bincount(y[i], minlength=5), torch.full((5,), shots))
    assert len(set(i.tolist())) == len(i)
    assert torch.equal(i, sample_shots(y, shots, seed=3))
    assert not torch.equal(i, sample_shots(y, shots, seed=4))


def test_sample_shots_too_many(split):
    with pytest.raises(ValueError, match='shot pool'): sample_shots(split['pool'].y, 1000, seed=0)


def test_pretraining_beats_chance(pretrained):
    assert pretrained[1] > 0.4  # chance is 0.2 on digits 0-4


def _diff(before, after):
    return {n: int((before[n] != after[n]).sum()) for n in before}


def test_so_changes_only_allowed_params(split, pretrained):
    state = pretrained[0]
    r = adapt('SO', state, TINY, split, shots=2, seed=1, lr=1e-2, track=True)
    model, opt, after = r['model'], r['opt'], r['model'].state_dict()
    d = _diff({n: v for n, v in state.items() if not n.startswith('head.')}, after)
    for n in ('patch.weight', 'cls', 'pos'): assert d[n] == 0, n
    for n, p in model.named_parameters():
        if n.startswith('blocks.') and p.ndim == 2:
            k = int(p.numel() * TINY.density_ratio)
            moved = (after[n] != state[n]).flatten()
            assert 0 < int(moved.sum()) <= 2 * k * TINY.steps, n
            assert not (moved & ~opt.support(p)['changed']).any(), n  # only coordinates SO says it changed
        elif n != 'patch.weight' and p.ndim < 2: assert d.get(n, 1) > 0, n  # biases and LayerNorms are trained densely
    assert r['train_loss'][-1] < r['train_loss'][0]


def test_lora_keeps_base_weights(split, pretrained):
    state = pretrained[0]
    r = adapt('LoRA', state, TINY, split, shots=2, seed=1, lr=1e-2)
    after = {n.replace('.base.', '.'): v for n, v in r['model'].state_dict().items()}
    for n, v in state.items():
        if n.startswith('head.'): continue
        if v.ndim >= 2: assert torch.equal(after[n], v), n  # block matrices, patch embedding, cls, positions frozen
        else: assert not torch.equal(after[n], v), n  # biases and LayerNorms trained densely
    lora_b = [v for n, v in after.items() if 'lora_B' in n]
    assert len(lora_b) == 4 * TINY.depth and all(v.abs().sum() > 0 for v in lora_b)  # the low-rank updates moved away from zero
    assert not torch.equal(after['head.weight'], make_arm('Head', state, TINY, 1e-2, seed=1)[0].head.weight)


def test_lora_matches_peft():
    "Our LoRALinear computes what peft's LoRA computes for the same weights (forward and gradients, float64)."
    from peft import LoraConfig, get_peft_model
    cfg = QuickstartConfig()
    torch.manual_seed(0); ours = add_lora(build_model(cfg), r=2, alpha=2.0)
    torch.manual_seed(0); theirs = get_peft_model(build_model(cfg), LoraConfig(r=2, lora_alpha=2.0, lora_dropout=0.0, target_modules=['qkv', 'proj', 'fc1', 'fc2']))
    g = torch.Generator().manual_seed(1)
    for bi, b in enumerate(ours.blocks):
        for name in ('qkv', 'proj', 'fc1', 'fc2'):
            mine, ref = getattr(b, name), getattr(theirs.base_model.model.blocks[bi], name)
            assert isinstance(mine, LoRALinear) and torch.equal(mine.base.weight, ref.base_layer.weight)
            with torch.no_grad():
                mine.lora_A.copy_(torch.randn(mine.lora_A.shape, generator=g, dtype=torch.float64))
                mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=g, dtype=torch.float64))
                ref.lora_A['default'].weight.copy_(mine.lora_A); ref.lora_B['default'].weight.copy_(mine.lora_B)
    x = make_split()['test'].x[:16]
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a.square().sum().backward(); b.square().sum().backward()
    torch.testing.assert_close(ours.blocks[1].fc2.lora_A.grad, theirs.base_model.model.blocks[1].fc2.lora_A['default'].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.blocks[0].qkv.delta(), theirs.base_model.model.blocks[0].qkv.get_delta_weight('default'), rtol=1e-12, atol=1e-14)


def test_head_only_and_adam(split, pretrained):
    state = pretrained[0]
    head = adapt('Head', state, TINY, split, shots=2, seed=1, lr=1e-2)['model'].state_dict()
    assert all(torch.equal(head[n], v) for n, v in state.items() if not n.startswith('head.'))
    adam = adapt('Adam', state, TINY, split, shots=2, seed=1, lr=1e-3)['model'].state_dict()
    assert not torch.equal(adam['patch.weight'], state['patch.weight'])  # Adam trains all weights


def test_same_head_init_for_every_arm(pretrained):
    heads = [make_arm(a, pretrained[0], TINY, 1e-3, seed=5)[0] for a in ('SO', 'Adam', 'Head')]
    assert all(torch.equal(h.head.weight, heads[0].head.weight) for h in heads)


def test_float64_by_default(split, pretrained):
    assert all(v.dtype == torch.float64 for v in pretrained[0].values() if v.is_floating_point())
    model, opt = make_arm('LoRA', pretrained[0], TINY, 1e-3, seed=1)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    m32 = build_model(dataclasses.replace(TINY, dtype='float32'))
    assert {p.dtype for p in m32.parameters()} == {torch.float32} and m32(split['test'].x[:2]).dtype == torch.float32


def test_adapt_deterministic(split, pretrained):
    a = adapt('SO', pretrained[0], TINY, split, shots=1, seed=2, lr=3e-3)
    b = adapt('SO', pretrained[0], TINY, split, shots=1, seed=2, lr=3e-3)
    assert a['train_loss'] == b['train_loss'] and a['eval_acc'] == b['eval_acc']


def test_cache_invalidated_by_config(split, tmp_path):
    cfg = dataclasses.replace(TINY, pretrain_steps=5)
    s1, i1 = load_or_pretrain(cfg, split, tmp_path)
    s2, i2 = load_or_pretrain(cfg, split, tmp_path)
    assert (i1['cached'], i2['cached']) == (False, True) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not load_or_pretrain(dataclasses.replace(cfg, dim=32), split, tmp_path)[1]['cached']  # other settings: retrain
    assert not load_or_pretrain(dataclasses.replace(cfg, dim=32), split, tmp_path, force=True)[1]['cached']
    (tmp_path / 'pretrained.pt').write_bytes(b'not a checkpoint')
    assert not load_or_pretrain(cfg, split, tmp_path)[1]['cached']


def _cli(*args, **env):
    env = dict(os.environ, HF_HUB_OFFLINE='1', MPLBACKEND='Agg', **env)
    return subprocess.run([sys.executable, '-m', 'so_tutorial.cli', 'quickstart', *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def _is_png(p): return p.stat().st_size > 1000 and p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

VERDICT = re.compile(r'^SO[<>~?]Adam; SO[<>~?]LoRA; SO[<>~?]Head$')


def test_cli_fast_end_to_end_cache_workers_and_kernels(tmp_path):
    out = tmp_path / 'qs'
    p = _cli('--fast', '--output', str(out), '--workers', '2')
    assert p.returncode == 0, p.stderr[-2000:]
    assert '| shots | SO | Adam | LoRA | Head |' in p.stdout and '| shots | SO - Adam | SO - LoRA | SO - Head |' in p.stdout
    assert 'verdict (pooled intervals' in p.stdout and 'with 2 worker processes' in p.stdout
    table = pd.read_csv(out / 'table.csv')
    assert list(table.columns) == ['shots', 'arm', 'acc_mean', 'acc_std', 'n_seeds']
    assert sorted(table.shots.unique()) == [1, 4] and set(table.arm) == {'SO', 'Adam', 'LoRA', 'Head'}
    assert (table.n_seeds == 2).all() and table.acc_mean.between(0, 100).all()
    md = (out / 'table.md').read_text().splitlines()
    assert md[0] == '| shots | SO | Adam | LoRA | Head |' and len(md) == 4 and all('±' in l for l in md[2:])
    cmp_md = (out / 'comparisons.md').read_text().splitlines()
    assert cmp_md[0] == '| shots | SO - Adam | SO - LoRA | SO - Head |' and [l.split('|')[1].strip() for l in cmp_md[2:]] == ['1', '4', 'all']
    comps = pd.read_csv(out / 'comparisons.csv')
    assert len(comps) == 3 * 3 and (comps.n_seeds == 2).all() and (comps.ci_low <= comps.diff_mean).all() and (comps.diff_mean <= comps.ci_high).all()
    runs = pd.read_csv(out / 'runs.csv')
    assert len(runs) == 2 * 2 * 4 and list(runs.columns) == ['arm', 'shots', 'seed', 'lr', 'acc']
    curves = pd.read_csv(out / 'curves.csv')
    assert {'arm', 'shots', 'seed', 'step', 'train_loss', 'test_acc'} <= set(curves.columns) and curves.step.max() == 20
    for name in FIGURES: assert _is_png(out / f'{name}.png'), name
    res = json.loads((out / 'result.json').read_text())
    assert {'config', 'lrs', 'lr_choice', 'pretrain', 'results', 'comparisons', 'verdict', 'machine_info', 'wall_time_s'} <= set(res)
    assert res['config']['steps'] == 20 and res['config']['seeds'] == [1, 2] and res['wall_time_s'] > 0 and res['config']['dtype'] == 'float64'
    assert 'fixed_lrs' not in res['config'] and 'lrs' not in res['config']  # the lrs are recorded once, as used
    assert res['lrs'] == QuickstartConfig().fixed_lrs and set(runs.groupby('arm').lr.first().items()) == set(res['lrs'].items())
    assert res['lr_choice'].startswith('fixed') and VERDICT.match(res['verdict']), res['verdict']
    pooled = comps[comps.shots.astype(str) == 'all']  # the verdict, derived here from the CSV's pooled intervals
    mine = '; '.join(f"SO{'>' if lo > 0 else '<' if hi < 0 else '~'}{vs}" for vs, lo, hi in zip(pooled.vs, pooled.ci_low, pooled.ci_high))
    assert res['verdict'] == mine, (res['verdict'], mine)
    assert res['pretrain']['cached'] is False and res['pretrain']['acc'] > 0.4 and 'torch' in res['machine_info']
    assert res['machine_info']['cpu_capability'] and res['workers'] == 2
    assert not list(out.glob('.*.tmp'))  # atomic writes leave no temporary files
    # rerun in one process with the portable kernel set: the cached backbone is reused, and neither the number of
    # processes nor the kernel set changes a single accuracy (float64), so the verdict is the same
    p2 = _cli('--fast', '--output', str(out), '--workers', '1', ATEN_CPU_CAPABILITY='default')
    assert p2.returncode == 0, p2.stderr[-2000:]
    res2 = json.loads((out / 'result.json').read_text())
    assert res2['pretrain']['cached'] is True and res2['machine_info']['cpu_capability'] == 'DEFAULT'
    assert res2['results'] == res['results'] and res2['verdict'] == res['verdict']
    assert pd.read_csv(out / 'runs.csv').equals(runs)


def test_cli_unknown_option():
    p = _cli('--bogus')
    assert p.returncode == 2 and 'unrecognized arguments: --bogus' in p.stderr


@pytest.mark.parametrize('bad', [['--shots', '0'], ['--seeds', 'a,b'], ['--steps', '-3'], ['--steps', '3,4'], ['--workers', '0']])
def test_cli_malformed_values(bad):
    from so_tutorial.quickstart import cli
    with pytest.raises(SystemExit) as e: cli(bad)
    assert e.value.code == 2


def test_cli_output_under_a_file(tmp_path):
    blocker = tmp_path / 'a_file'; blocker.write_text('x')
    p = _cli('--fast', '--output', str(blocker / 'out'))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in p.stderr and str(blocker / 'out') in lines[0] and 'cannot write' in lines[0]


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='root can write to read-only folders')
def test_cli_read_only_output(tmp_path):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try: p = _cli('--fast', '--output', str(ro))
    finally: ro.chmod(stat.S_IRWXU)
    assert p.returncode == 1 and 'Traceback' not in p.stderr and str(ro) in p.stderr


def test_too_many_shots(tmp_path):
    from so_tutorial.quickstart import cli
    with pytest.raises(UserError, match='shot pool'): cli(['--shots', '1,500', '--output', str(tmp_path)])


def test_cli_bad_workers():
    from so_tutorial.quickstart import cli
    with pytest.raises(SystemExit) as e: cli(['--workers', '0'])
    assert e.value.code == 2


# ---- paired statistics and the verdict


def test_mean_ci_known_values():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    h = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert m == 3.0 and abs(lo - (3 - h)) < 1e-9 and abs(hi - (3 + h)) < 1e-9
    m, lo, hi = mean_ci([2.0, 4.0], conf=0.9)  # t(0.95, 1) = 6.3138
    assert abs(lo - (3 - 6.313751514675 * math.sqrt(2) / math.sqrt(2))) < 1e-9
    assert mean_ci([4.0, 4.0, 4.0]) == (4.0, 4.0, 4.0)  # no spread: the interval is the point
    m, lo, hi = mean_ci([7.0])
    assert m == 7.0 and math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize('lo,hi,label', [(0.1, 3.0, '>'), (-3.0, -0.1, '<'), (-1.0, 2.0, '~'), (0.0, 2.0, '~'),
                                         (-2.0, 0.0, '~'), (math.nan, math.nan, '?')])
def test_ci_label(lo, hi, label):
    assert ci_label(lo, hi) == label


def _fake_runs(seeds=range(1, 6), shots=(1, 4)):
    "SO: 50+s; Head exactly 10 below; Adam level on average with swings; LoRA 1-3 points above SO."
    delta = {'SO': lambda s, n: 0, 'Head': lambda s, n: -10, 'Adam': lambda s, n: (-3, 3, -2, 2, 0)[(s - 1) % 5],
             'LoRA': lambda s, n: 1 + s % 3}
    return [dict(arm=a, shots=n, seed=s, acc=(50 + s + delta[a](s, n)) / 100) for n in shots for s in seeds for a in ('SO', 'Adam', 'LoRA', 'Head')]


def test_paired_differences_and_comparisons():
    runs = _fake_runs()
    d = paired_differences(runs)
    assert set(d.vs) == {'Adam', 'LoRA', 'Head'} and len(d) == 3 * 2 * 5
    assert np.allclose(d[d.vs == 'Head']['diff'], 10)
    comps = compare_arms(runs).set_index(['vs', 'shots'])
    assert list(comps.index.get_level_values('shots').unique()) == [1, 4, 'all'] and (comps.n_seeds == 5).all()
    assert comps.loc[('Head', 'all'), 'label'] == '>' and abs(comps.loc[('Head', 'all'), 'diff_mean'] - 10) < 1e-9
    assert comps.loc[('Adam', 'all'), 'label'] == '~' and abs(comps.loc[('Adam', 'all'), 'diff_mean']) < 1e-9
    lora = comps.loc[('LoRA', 'all')]
    assert lora.label == '<' and abs(lora.diff_mean + 2.2) < 1e-9
    m, lo, hi = mean_ci([-2, -3, -1, -2, -3])
    assert abs(lora.ci_low - lo) < 1e-9 and abs(lora.ci_high - hi) < 1e-9
    assert verdict(compare_arms(runs)) == 'SO~Adam; SO<LoRA; SO>Head'


def test_pooled_is_the_per_seed_mean_over_shots():
    "Shot counts with opposite effects cancel in the pooled difference; each seed is one unit."
    # accuracies that are exact in binary (multiples of 1/64), so the pooled mean is exactly 0
    runs = [dict(arm=a, shots=n, seed=s, acc=0.5 + (s if a == 'SO' else 0) * (1 if n == 1 else -1) / 64)
            for n in (1, 4) for s in (1, 2, 3) for a in ('SO', 'Adam')]
    comps = compare_arms(runs).set_index('shots')
    assert comps.loc[1, 'diff_mean'] == 2 * 100 / 64 and comps.loc[4, 'diff_mean'] == -2 * 100 / 64
    assert comps.loc['all', 'diff_mean'] == 0.0 and comps.loc['all', 'n_seeds'] == 3 and comps.loc['all', 'label'] == '~'


def test_verdict_needs_two_seeds():
    assert verdict(compare_arms(_fake_runs(seeds=(1,)))) == 'SO?Adam; SO?LoRA; SO?Head'
    assert 'nan' not in comparison_table(compare_arms(_fake_runs(seeds=(1,))))


# ---- the lr choice


def test_choose_lr_tie_rule():
    assert choose_lr({1e-3: 0.70, 3e-3: 0.745, 1e-2: 0.75}, tol=0.01) == 3e-3  # within the tolerance: the smaller lr
    assert choose_lr({1e-3: 0.70, 3e-3: 0.73, 1e-2: 0.75}, tol=0.01) == 1e-2   # a clear best wins
    assert choose_lr({1e-2: 0.8, 3e-3: 0.8}, tol=0.0) == 3e-3                    # exact ties: the smaller lr
    assert choose_lr({3e-3: 0.8, 1e-2: 0.8 + 1e-15}, tol=0.01) == 3e-3          # noise below the tolerance cannot flip it
    assert choose_lr({3e-3: 0.8 + 1e-15, 1e-2: 0.8}, tol=0.01) == 3e-3


def test_grid_grows_toward_the_best():
    assert _grow([1e-3, 3e-3, 1e-2], {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}, 0.01) == [3e-2]   # best at the top: add above
    assert _grow([1e-3, 3e-3, 1e-2], {1e-3: 0.7, 3e-3: 0.6, 1e-2: 0.5}, 0.01) == [3e-4]   # chosen at the bottom: add below
    assert _grow([1e-3, 3e-3, 1e-2], {1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}, 0.01) == []       # interior optimum: done
    assert _grow([1e-3, 3e-3, 1e-2], {1e-3: 0.695, 3e-3: 0.6, 1e-2: 0.7}, 0.01) == [3e-2, 3e-4]


def test_tune_lrs_scores_pool_the_tuning_seeds(split, pretrained):
    from so_tutorial.quickstart import tune_lrs
    cfg = dataclasses.replace(TINY, arms=('Head',), lr_grid=(1e-3, 1e-2), tune_seeds=(101, 102), tune_extend=0, steps=4)
    lrs, scores = tune_lrs(pretrained[0], cfg, split)
    one = [adapt('Head', pretrained[0], cfg, split, cfg.tune_shots, s, 1e-2, on='val', eval_every=cfg.steps)['acc'] for s in (101, 102)]
    assert abs(scores.set_index('lr').val_acc[1e-2] - np.mean(one)) < 1e-12
    assert lrs['Head'] == choose_lr(scores.set_index('lr').val_acc.to_dict(), cfg.tie_tol) and scores.chosen.sum() == 1


def test_run_jobs_same_results_with_workers(split, pretrained):
    jobs = [dict(arm=a, shots=1, seed=s, lr=1e-2) for a in ('SO', 'LoRA') for s in (1, 2)]
    one, two = run_jobs(pretrained[0], TINY, split, jobs), run_jobs(pretrained[0], TINY, split, jobs, workers=2)
    assert [(r['arm'], r['seed']) for r in two] == [(j['arm'], j['seed']) for j in jobs]
    assert [r['acc'] for r in one] == [r['acc'] for r in two] and [r['train_loss'] for r in one] == [r['train_loss'] for r in two]


# ---- the committed run and the README


def test_readme_quotes_the_committed_run():
    "README's quickstart block is generated from results/quickstart; both kernel sets gave the same verdict and accuracies."
    import runpy
    readme = runpy.run_path(str(ROOT / '.ci' / 'readme.py'))
    block = readme['quickstart_block']()
    res = json.loads((ROOT / 'results' / 'quickstart' / 'result.json').read_text())
    other = json.loads((ROOT / 'results' / 'quickstart_default_kernels' / 'result.json').read_text())
    text = (ROOT / 'README.md').read_text()
    assert block in text and f"**{res['verdict']}**" in block and (ROOT / 'results' / 'quickstart' / 'table.md').read_text().strip() in block
    assert VERDICT.match(res['verdict']) and other['machine_info']['cpu_capability'] == 'DEFAULT'
    assert other['verdict'] == res['verdict'] and other['results'] == res['results'] and other['lrs'] == res['lrs']
    assert len(res['config']['seeds']) >= 5 and res['config']['dtype'] == 'float64' and 'the same verdict' in block
