"Quickstart (few-shot digits): data split, pretraining, the four arms, the CLI end to end, caching and bad input."
import os, sys, json, stat, subprocess, dataclasses
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
from pathlib import Path
import pandas as pd, pytest, torch
from so_tutorial.io import UserError
from so_tutorial.quickstart import (QuickstartConfig, make_split, sample_shots, load_digits_tensors, pretrain, load_or_pretrain,
                                    make_arm, adapt, FIGURES)

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
    after = {n.replace('base_model.model.', '').replace('.base_layer', ''): v for n, v in r['model'].state_dict().items()}
    for n, v in state.items():
        if n.startswith('head.'): continue
        if v.ndim >= 2: assert torch.equal(after[n], v), n  # block matrices, patch embedding, cls, positions frozen
    lora_b = [v for n, v in after.items() if 'lora_B' in n]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the low-rank updates moved away from zero
    assert not torch.equal(after['head.weight'], make_arm('Head', state, TINY, 1e-2, seed=1)[0].head.weight)


def test_head_only_and_adam(split, pretrained):
    state = pretrained[0]
    head = adapt('Head', state, TINY, split, shots=2, seed=1, lr=1e-2)['model'].state_dict()
    assert all(torch.equal(head[n], v) for n, v in state.items() if not n.startswith('head.'))
    adam = adapt('Adam', state, TINY, split, shots=2, seed=1, lr=1e-3)['model'].state_dict()
    assert not torch.equal(adam['patch.weight'], state['patch.weight'])  # Adam trains all weights


def test_same_head_init_for_every_arm(pretrained):
    heads = [make_arm(a, pretrained[0], TINY, 1e-3, seed=5)[0] for a in ('SO', 'Adam', 'Head')]
    assert all(torch.equal(h.head.weight, heads[0].head.weight) for h in heads)


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


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    return subprocess.run([sys.executable, '-m', 'so_tutorial.cli', 'quickstart', *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _is_png(p): return p.stat().st_size > 1000 and p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_fast_end_to_end_and_cache(tmp_path):
    out = tmp_path / 'qs'
    p = _cli('--fast', '--output', str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert '| shots | SO | Adam | LoRA | Head |' in p.stdout and 'wins on this task' in p.stdout
    table = pd.read_csv(out / 'table.csv')
    assert list(table.columns) == ['shots', 'arm', 'acc_mean', 'acc_std', 'n_seeds']
    assert sorted(table.shots.unique()) == [1, 4] and set(table.arm) == {'SO', 'Adam', 'LoRA', 'Head'}
    assert (table.n_seeds == 2).all() and table.acc_mean.between(0, 100).all()
    md = (out / 'table.md').read_text().splitlines()
    assert md[0] == '| shots | SO | Adam | LoRA | Head |' and len(md) == 4 and all('±' in l for l in md[2:])
    runs = pd.read_csv(out / 'runs.csv')
    assert len(runs) == 2 * 2 * 4 and list(runs.columns) == ['arm', 'shots', 'seed', 'lr', 'acc']
    curves = pd.read_csv(out / 'curves.csv')
    assert {'arm', 'shots', 'seed', 'step', 'train_loss', 'test_acc'} <= set(curves.columns) and curves.step.max() == 30
    for name in FIGURES: assert _is_png(out / f'{name}.png'), name
    res = json.loads((out / 'result.json').read_text())
    assert {'config', 'lrs', 'pretrain', 'results', 'verdict', 'machine_info', 'wall_time_s'} <= set(res)
    assert res['config']['steps'] == 30 and res['config']['seeds'] == [1, 2] and res['wall_time_s'] > 0
    assert res['pretrain']['cached'] is False and res['pretrain']['acc'] > 0.4 and 'torch' in res['machine_info']
    assert not list(out.glob('.*.tmp'))  # atomic writes leave no temporary files
    # rerun: the cached backbone is reused (and the results are identical: the runs are deterministic)
    p2 = _cli('--fast', '--output', str(out))
    assert p2.returncode == 0, p2.stderr[-2000:]
    res2 = json.loads((out / 'result.json').read_text())
    assert res2['pretrain']['cached'] is True and res2['results'] == res['results']


def test_cli_unknown_option():
    p = _cli('--bogus')
    assert p.returncode == 2 and 'unrecognized arguments: --bogus' in p.stderr


@pytest.mark.parametrize('bad', [['--shots', '0'], ['--seeds', 'a,b'], ['--steps', '-3']])
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
