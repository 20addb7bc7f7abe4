"SO's experimental hooks (score, refresh) and the ablation variants built on them (so_tutorial.ablate)."
import torch, pytest
from so_tutorial.optim import SO


def layer(n=(6, 8), k_ratio=0.25, T=3, seed=0):
    w = torch.nn.Parameter(torch.zeros(*n, dtype=torch.float64))
    return w, SO([w], lr=1e-2, density_ratio=k_ratio, T=T, generator=torch.Generator().manual_seed(seed))


def grads(steps, n=(6, 8), seed=1, shrink=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*n, dtype=torch.float64, generator=g) * shrink ** t for t in range(steps)]


def run(w, opt, gs, after=None):
    for t, g in enumerate(gs, 1):
        w.grad = g.clone(); opt.step()
        if after: after(t)


# --- the hooks in SO -----------------------------------------------------------------------------------

def test_score_hook_abs_m_is_plain_so():
    gs = grads(12)
    w1, o1 = layer(); run(w1, o1, gs)
    w2, o2 = layer(); o2.register_score_hook(lambda opt, p, keys, live, in_M, m, v: m.abs()); run(w2, o2, gs)
    assert torch.equal(w1, w2) and torch.equal(o1.state[w1]['moment_support'], o2.state[w2]['moment_support'])


def test_score_hook_changes_the_kept_set_and_can_be_removed():
    gs = grads(12)
    w1, o1 = layer(); run(w1, o1, gs)
    w2, o2 = layer(); h = o2.register_score_hook(lambda opt, p, keys, live, in_M, m, v: 1 / (m.abs() + 1e-12)); run(w2, o2, gs)
    assert not torch.equal(o1.state[w1]['moment_support'], o2.state[w2]['moment_support'])
    assert o2.state[w2]['moment_support'].numel() == o1.state[w1]['moment_support'].numel()
    h.remove(); assert not o2._score_hooks


def test_refresh_hook_runs_at_each_redraw_only():
    calls = []
    w, opt = layer(T=3)
    opt.register_refresh_hook(lambda o, p, st: calls.append((int(st['step']) + 1, p is w, st['grad_support'].clone())))
    run(w, opt, grads(10))
    assert [c[0] for c in calls] == [4, 7, 10] and all(c[1] for c in calls)
    assert torch.equal(calls[-1][2], opt.state[w]['grad_support'])  # it sees the new support


# --- the variants ----------------------------------------------------------------------------------------

from so_tutorial import ablate
from so_tutorial.ablate import VARIANTS, apply_variant, variant_T


def trace(variant, steps=30, T=3, shrink=0.8, attach_after_first=False):
    "(S, M, m, g at S) after every step of a 6x8 tensor (k = 12) trained with `variant`."
    w, opt = layer(T=variant_T(variant, T, steps))
    if not attach_after_first: apply_variant(opt, variant, seed=0)
    out = []
    for t, g in enumerate(grads(steps, shrink=shrink), 1):
        w.grad = g.clone(); opt.step()
        if attach_after_first and t == 1: apply_variant(opt, variant, seed=0)
        st = opt.state[w]
        out.append((st['grad_support'].clone(), st['moment_support'].clone(), st['exp_avg'].clone(), g.flatten()[st['grad_support']]))
    return out


def entrants(tr): return [int((~torch.isin(b[1], a[1])).sum()) for a, b in zip(tr, tr[1:])]


def draws(tr): return [t for t, (a, b) in enumerate(zip(tr, tr[1:]), 2) if not torch.equal(a[0], b[0])]


def test_published_is_plain_so():
    w, opt = layer()
    assert apply_variant(opt, 'published') == []
    assert not (opt._score_hooks or opt._refresh_hooks or opt._prune_hooks)  # nothing attached: SO as published runs unchanged


def test_reset_leaves_no_moment_older_than_the_refresh():
    tr = trace('reset', T=3)
    assert all(torch.equal(S, M) for S, M, _, _ in tr)  # M is the current S: nothing kept from before the refresh
    assert all(torch.allclose(m, 0.1 * g) for _, _, m, g in tr[3::3])  # right after each refresh: one step of memory
    pub = trace('published', T=3)
    assert not all(torch.equal(S, M) for S, M, _, _ in pub)  # plain SO keeps older moments (the test can fail)


def test_fixed_support_never_redraws_and_T1_redraws_every_step():
    assert variant_T('fixed', 5, 30) == 30 and variant_T('fixed', 50, 30) == 50 and variant_T('T1', 5, 30) == 1
    assert variant_T('published', 5, 30) == 5
    fixed, t1, pub = trace('fixed'), trace('T1'), trace('published', T=3)
    assert draws(fixed) == [] and sum(entrants(fixed)) == 0
    assert draws(t1) == list(range(2, 31))
    assert draws(pub) == list(range(4, 31, 3))


def test_random_prune_keeps_k_slots_and_differs_from_abs_m():
    rnd, pub = trace('random_prune'), trace('published')
    assert all(M.numel() == 12 and M.unique().numel() == 12 and torch.equal(M, M.sort().values) for _, M, _, _ in rnd)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(rnd, pub))
    # it keeps some candidate with a smaller |m| than one it drops: not the top-k rule
    w, opt = layer(T=1)
    seen = []
    opt.register_prune_hook(lambda o, p, keys, live, m, kept: seen.append((m[live & kept].abs().min(), m[live & ~kept].abs().max()
                                                                           if (live & ~kept).any() else torch.tensor(0.))))
    apply_variant(opt, 'random_prune', seed=0)
    for g in grads(10): w.grad = g.clone(); opt.step()
    assert any(lo < hi for lo, hi in seen)


def test_fair_admits_fresh_coordinates_that_published_would_not():
    fair, pub = trace('fair'), trace('published')
    late = slice(15, None)
    assert sum(entrants(fair)[late]) > sum(entrants(pub)[late]) + 5
    a = ablate.AgeCorrected()
    w, opt = layer(T=1)
    opt.register_score_hook(a.score); opt.register_prune_hook(a.kept)
    for g in grads(8, shrink=0.8): w.grad = g.clone(); opt.step()
    assert a.born[w].numel() == 12 and int(a.born[w].min()) >= 1 and int(a.born[w].max()) <= 8


def test_hooks_attached_after_step_one_take_the_same_trajectory():
    hooked = [v for v in VARIANTS if apply_variant(layer()[1], v)]  # the others attach nothing: equal trivially
    assert set(hooked) == {'reset', 'random_prune', 'fair'}
    for v in hooked:
        a, b = trace(v), trace(v, attach_after_first=True)
        assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b)), v


def test_unknown_variant_is_refused():
    w, opt = layer()
    with pytest.raises(ValueError, match='choose from'): apply_variant(opt, 'nope')
    with pytest.raises(ValueError, match='choose from'): variant_T('nope', 5, 30)


# --- the command -----------------------------------------------------------------------------------------

import contextlib, io, json, subprocess, sys
import pandas as pd
from so_tutorial.cli import main


def quiet(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        try: code = main(argv)
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ablate')
    code, stdout, err = quiet(['ablate', '--output', str(out), '--fast', '--workers', '1', '--seeds', '3'])
    return code, out, stdout


def test_fast_run_writes_the_three_files(fast_run):
    code, out, stdout = fast_run
    assert code == 0 and 'wrote' in stdout
    df = pd.read_csv(out / 'ablations.csv')
    assert list(df.columns[:3]) == ['variant', 'shots', 'seed'] and {'acc', 'train_loss', 'new_per_step'} <= set(df.columns)
    assert len(df) == len(ablate.ARMS) * 3 and set(df.variant) == set(ablate.ARMS) and sorted(df.seed.unique()) == [1, 2, 3]
    so = df[df.variant.isin(list(VARIANTS))]
    assert so.new_per_step.notna().all() and df[~df.variant.isin(list(VARIANTS))].new_per_step.isna().all()
    assert (so[so.variant == 'fixed'].new_per_step == 0).all() and (so[so.variant == 'T1'].new_per_step > 0).all()
    md = (out / 'ablations.md').read_text()
    assert all(f'| {a} |' in md for a in ablate.ARMS) and '95% CI' in md
    assert (out / 'ablations.png').read_bytes()[:4] == b'\x89PNG'
    assert not list(out.glob('*.tmp*'))



def test_plot_ablations_closes_its_figure_and_marks_missing_turnover_na(fast_run):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    code, out, stdout = fast_run
    plt.close('all')
    fig = ablate.plot_ablations(ablate.ablation_table(pd.read_csv(out / 'ablations.csv')))
    assert plt.get_fignums() == []  # closed: the caller displays it once
    ax = fig.axes[2]
    assert len(ax.patches) == len(VARIANTS)  # one bar per SO variant, none for Adam and LoRA
    assert sorted(t.get_text() for t in ax.texts) == ['n/a'] * len(ablate.BASELINES)

@pytest.mark.parametrize('argv, what', [(['--seeds', '1'], '--seeds'), (['--seeds', 'x'], '--seeds'), (['--workers', '0'], '--workers'),
                                        (['--bogus'], 'unrecognized')])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, argv, what):
    code, out, err = quiet(['ablate', '--output', str(tmp_path), '--fast', *argv])
    assert code == 2 and what in err.strip().splitlines()[-1] and 'Traceback' not in err
    assert not (tmp_path / 'ablations.csv').exists()


def test_unwritable_output_is_exit_2(tmp_path):
    f = tmp_path / 'file'; f.write_text('x')
    code, _, err = quiet(['ablate', '--output', str(f / 'sub'), '--fast'])
    assert code == 2 and 'output' in err.strip().splitlines()[-1]


# --- --so-variant in the CLIP pipeline ---------------------------------------------------------------------

from so_tutorial import clip
from so_tutorial.data import write_fixture_tree
from so_tutorial.io import UserError


@pytest.fixture(scope='module')
def clip_env(tmp_path_factory):
    d = tmp_path_factory.mktemp('clip_variant')
    write_fixture_tree(d / 'data', keys=['dtd'])
    return dict(root=d / 'data', tiny=clip.tiny_config(d / 'tiny.json'), out=d / 'runs')


def clip_argv(env, *extra):
    return ['clip', '--root', str(env['root']), '--dataset', 'dtd', '--shots', '2', '--seed', '1', '--method', 'so',
            '--backbone', str(env['tiny']), '--pretrained', 'none', '--n-iters', '3', '--batch-size', '4', '--lr', '1e-2',
            '--density-ratio', '0.05', '--device', 'cpu', '--workers', '0', '--output', str(env['out']), *extra]


def clip_cfg(env, **kw):
    return clip.ClipConfig(root=str(env['root']), dataset='dtd', shots=2, seed=1, method='so', backbone=str(env['tiny']),
                           pretrained='none', n_iters=3, batch_size=4, lr=1e-2, density_ratio=0.05, device='cpu', workers=0, **kw).resolved()


def test_default_variant_leaves_run_identity_and_folder_unchanged(clip_env):
    c = clip_cfg(clip_env)
    assert 'so_variant' not in c.identity() and c.record()['so_variant'] == 'published' and '_v-' not in c.run_id()
    r = clip_cfg(clip_env, so_variant='reset')
    assert r.identity()['so_variant'] == 'reset' and '_v-reset' in r.run_id() and r.run_id().replace('_v-reset', '') == c.run_id()
    assert clip_cfg(clip_env, so_variant='fixed').T == 3 * 2 and clip_cfg(clip_env, so_variant='T1').T == 1
    assert 'so_variant' not in clip.ClipConfig(method='lora', so_variant='reset', device='cpu').resolved().record()


def test_clip_cli_accepts_and_records_a_variant_and_old_runs_still_match(clip_env):
    code, out, err = quiet(clip_argv(clip_env))
    d = clip_env['out'] / clip_cfg(clip_env).run_id()
    assert code == 0, err
    r = json.loads((d / 'result.json').read_text())
    assert r['config']['so_variant'] == 'published'
    # a result written before the option existed: no so_variant anywhere; it is still this run
    r['config'].pop('so_variant'); r['identity'].pop('so_variant', None)
    (d / 'result.json').write_text(json.dumps(r))
    code, out, _ = quiet(clip_argv(clip_env))
    assert code == 0 and 'finished already' in out
    code, out, err = quiet(clip_argv(clip_env, '--so-variant', 'fair'))
    dv = clip_env['out'] / clip_cfg(clip_env, so_variant='fair').run_id()
    assert code == 0, err
    rv = json.loads((dv / 'result.json').read_text())
    assert rv['config']['so_variant'] == 'fair' and rv['identity']['so_variant'] == 'fair' and dv != d


def test_clip_cli_refuses_an_unknown_variant(clip_env):
    code, _, err = quiet(clip_argv(clip_env, '--so-variant', 'bogus'))
    assert code == 1 and '--so-variant' in err and 'choose from' in err and len(err.strip().splitlines()) == 1
    code, _, err = quiet(['sweep', 'clip', '--root', str(clip_env['root']),
                          '--datasets', 'dtd', '--shots', '2', '--seeds', '1', '--methods', 'so', '--backbone', str(clip_env['tiny']),
                          '--pretrained', 'none', '--device', 'cpu', '--output', str(clip_env['out']), '--so-variant', 'bogus'])
    assert code == 1 and '--so-variant' in err


def test_sweep_clip_passes_the_variant_to_its_jobs(clip_env):
    a = clip._parser('so-tutorial sweep clip', sweep=True).parse_args(
        ['--root', str(clip_env['root']), '--datasets', 'dtd', '--shots', '2', '--seeds', '1', '2', '--methods', 'so', 'lora',
         '--backbone', str(clip_env['tiny']), '--pretrained', 'none', '--device', 'cpu', '--so-variant', 'random_prune'])
    jobs = clip.sweep_jobs(a)
    so = [c for _, c in jobs if c.method == 'so']
    assert len(so) == 2 and all(c.so_variant == 'random_prune' and '_v-random_prune' in c.run_id() for c in so)
    assert all('_v-' not in rid for rid, c in jobs if c.method == 'lora')
