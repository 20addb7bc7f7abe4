"Exact save / resume: a run resumed in a fresh Python process continues bit-identically to an uninterrupted one."
import json, runpy, subprocess, sys, textwrap

import pytest
import torch
from torch import nn

from so_tutorial.optim import SO
from so_tutorial.viz import TrackedSO

N1, N2 = 6, 8  # save after N1 steps, then N2 more; sparse groups use T = 4 and T = 5 (refreshes at 9 and 11, 13)

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import torch
    from torch import nn
    from so_tutorial.optim import SO

    torch.set_num_threads(1)
    phase, out, n1, n2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)       # 4-D weight, 54 entries
            self.lin1 = nn.Linear(27, 8)         # 216 entries
            self.lin2 = nn.Linear(8, 3)          # 24 entries
        def forward(self, x):
            return self.lin2(torch.tanh(self.lin1(torch.tanh(self.conv(x)).flatten(1))))

    def build(init_seed, gen_kind, gen_seed, density=(0.25, 0.5), T=(4, 5), lr=1e-2):
        torch.manual_seed(init_seed)
        net = Net()
        groups = [dict(params=[net.conv.weight, net.lin1.weight], density_ratio=density[0], T=T[0]),
                  dict(params=[net.lin2.weight], density_ratio=density[1], T=T[1]),
                  dict(params=[net.conv.bias, net.lin1.bias, net.lin2.bias], dense=True)]
        gen = torch.Generator().manual_seed(gen_seed) if gen_kind == 'private' else None
        opt = SO(groups, lr=lr, weight_decay=1e-3, density_ratio=0.1, T=10, generator=gen)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)
        return net, opt, sched

    def train(net, opt, sched, start, stop):
        for s in range(start, stop):
            g = torch.Generator().manual_seed(1000 + s)  # data does not depend on the global generator
            x, y = torch.randn(4, 2, 5, 5, generator=g), torch.randn(4, 3, generator=g)
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
            sched.step()

    def params(net): return {k: v.detach().clone() for k, v in net.named_parameters()}

    def resume(gen_kind, ckpt, restore_rng=True, keep_gen_state=True):
        # different init, hyperparameters and generator seed: everything must come from the checkpoint
        net, opt, sched = build(123, gen_kind, 999, density=(0.9, 0.9), T=(7, 7), lr=0.5)
        torch.manual_seed(4242)
        net.load_state_dict(ckpt['model'])
        osd = dict(ckpt['opt'])
        if not keep_gen_state: osd.pop('so_generator_state', None)
        opt.load_state_dict(osd)
        sched.load_state_dict(ckpt['sched'])
        if gen_kind == 'global' and restore_rng: torch.set_rng_state(ckpt['rng'])
        return net, opt, sched

    results = {}
    for gen_kind in ('global', 'private'):
        if phase == 'first':
            # uninterrupted run
            net, opt, sched = build(0, gen_kind, 7)
            torch.manual_seed(7 if gen_kind == 'global' else 1)
            train(net, opt, sched, 0, n1 + n2)
            torch.save(params(net), f'{out}/full_{gen_kind}.pt')
            # first half, then checkpoint
            net, opt, sched = build(0, gen_kind, 7)
            torch.manual_seed(7 if gen_kind == 'global' else 2)
            train(net, opt, sched, 0, n1)
            ckpt = dict(model=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
            if gen_kind == 'global': ckpt['rng'] = torch.get_rng_state()
            else: assert 'so_generator_state' in ckpt['opt']
            torch.save(ckpt, f'{out}/ckpt_{gen_kind}.pt')
        else:
            ckpt = torch.load(f'{out}/ckpt_{gen_kind}.pt')
            net, opt, sched = resume(gen_kind, ckpt)
            g0, g1, g2 = opt.param_groups
            assert (g0['density_ratio'], g0['T'], g1['density_ratio'], g1['T']) == (0.25, 4, 0.5, 5), opt.param_groups
            assert g2['dense'] is True and not g0['dense']
            w = net.conv.weight
            st = opt.state[w]
            assert int(st['step']) == n1
            assert st['moment_support'].dtype == torch.int64 and st['grad_support'].dtype == torch.int64
            assert st['exp_avg'].dtype == torch.float32 and st['moment_support'].numel() == int(54 * 0.25)
            S0 = st['grad_support'].clone()
            train(net, opt, sched, n1, n1 + 1)
            mid_period = torch.equal(opt.state[w]['grad_support'], S0)
            train(net, opt, sched, n1 + 1, n1 + n2)
            refreshed = not torch.equal(opt.state[w]['grad_support'], S0)
            torch.save(params(net), f'{out}/resumed_{gen_kind}.pt')
            results[gen_kind] = dict(mid_period=mid_period, refreshed=refreshed,
                                     lr=opt.param_groups[0]['lr'], step=int(opt.state[w]['step']))
            # control: the same resume without the support generator state must diverge
            net, opt, sched = resume(gen_kind, ckpt, restore_rng=False, keep_gen_state=False)
            train(net, opt, sched, n1, n1 + n2)
            torch.save(params(net), f'{out}/control_{gen_kind}.pt')
    if phase == 'resume':
        json.dump(results, open(f'{out}/results.json', 'w'))
''')


def _run_in_process(script, phase, out):
    "The first phase needs no fresh process: run it here (one thread, as in the script), restoring global state."
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    argv = sys.argv
    try:
        sys.argv = [str(script), phase, str(out), str(N1), str(N2)]
        runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _run_script(script, phase, out):
    r = subprocess.run([sys.executable, str(script), phase, str(out), str(N1), str(N2)], capture_output=True, text=True,
                       timeout=300, cwd=out)
    assert r.returncode == 0, f'{phase} failed:\n{r.stdout}\n{r.stderr}'


@pytest.fixture(scope='module')
def resume_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('resume')
    script = out / 'resume_script.py'
    script.write_text(SCRIPT)
    _run_in_process(script, 'first', out)  # uninterrupted run + a checkpoint after N1 steps
    _run_script(script, 'resume', out)     # a fresh process loads the checkpoint and runs N2 more steps
    return out, json.loads((out / 'results.json').read_text())


@pytest.mark.parametrize('gen_kind', ['global', 'private'])
def test_resume_in_fresh_process_is_bit_identical(resume_run, gen_kind):
    out, results = resume_run
    full = torch.load(out / f'full_{gen_kind}.pt')
    resumed = torch.load(out / f'resumed_{gen_kind}.pt')
    assert full.keys() == resumed.keys()
    for name in full: assert torch.equal(full[name], resumed[name]), name
    res = results[gen_kind]
    assert res['mid_period'] and res['refreshed']  # resumed mid-period, and a refresh happened after the resume
    assert res['step'] == N1 + N2


@pytest.mark.parametrize('gen_kind', ['global', 'private'])
def test_resume_control_diverges(resume_run, gen_kind):
    "Without the saved support-generator state the continuation differs: the equality above is not vacuous."
    out, _ = resume_run
    full = torch.load(out / f'full_{gen_kind}.pt')
    control = torch.load(out / f'control_{gen_kind}.pt')
    assert not all(torch.equal(full[n], control[n]) for n in full)
    # the dense biases do not depend on the supports ... only through the loss: the sparse weights must differ
    assert not torch.equal(full['conv.weight'], control['conv.weight'])


def test_private_generator_draws_like_the_global_one(resume_run):
    "A private generator seeded 7 makes the same draws as the global generator seeded 7 (the parity sampler)."
    out, _ = resume_run
    a, b = torch.load(out / 'full_global.pt'), torch.load(out / 'full_private.pt')
    for n in a: assert torch.equal(a[n], b[n]), n


# ---------------------------------------------------------------- in-process state dict checks

def _setup(generator=None, track=False):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(12, 10), (30,), (2, 3, 4, 5), (6,)]]
    opt = (TrackedSO if track else SO)([dict(params=ps[:2]), dict(params=[ps[2]], density_ratio=0.5, T=2),
              dict(params=[ps[3]], dense=True)], lr=1e-2, density_ratio=0.1, T=3, generator=generator)
    return ps, opt


def _steps(ps, opt, start, stop, none_at=()):
    for s in range(start, stop):
        g = torch.Generator().manual_seed(s)
        for i, p in enumerate(ps):
            p.grad = None if (s, i) in none_at else torch.randn(p.shape, generator=g, dtype=p.dtype)
        torch.manual_seed(100 + s)
        opt.step()


@pytest.mark.parametrize('track', [False, True])
@pytest.mark.parametrize('private', [False, True])
def test_state_dict_round_trip(tmp_path, private, track):
    gen = (lambda: torch.Generator().manual_seed(5)) if private else (lambda: None)
    none_at = {(2, 1), (3, 2)}
    ps, opt = _setup(gen(), track)
    _steps(ps, opt, 0, 4, none_at)
    sd = opt.state_dict()
    assert ('so_generator_state' in sd) == private
    torch.save(sd, tmp_path / 'opt.pt')
    saved_params = [p.detach().clone() for p in ps]
    _steps(ps, opt, 4, 12)

    qs, opt2 = _setup(torch.Generator().manual_seed(77) if private else None, track)
    with torch.no_grad():
        for q, p0 in zip(qs, saved_params): q.copy_(p0)
    loaded = torch.load(tmp_path / 'opt.pt')
    opt2.load_state_dict(loaded)
    for q in qs[:3]:
        st = opt2.state[q]
        assert st['moment_support'].dtype == torch.int64 and st['grad_support'].dtype == torch.int64
        assert st['step'].dtype == torch.int64
        assert st['exp_avg'].dtype == torch.float64
        if track and q is not qs[2]:
            assert st['changed'].dtype == torch.bool and st['evicted'].dtype == torch.int64
    assert opt2.param_groups[1]['T'] == 2 and opt2.param_groups[1]['density_ratio'] == 0.5
    _steps(qs, opt2, 4, 12)
    for p, q in zip(ps, qs): assert torch.equal(p, q)
    for p, q in zip(ps, qs):
        for key, val in opt.state[p].items(): assert torch.equal(opt2.state[q][key], val), key


def test_load_private_generator_state_without_generator_raises():
    ps, opt = _setup(torch.Generator().manual_seed(5))
    _steps(ps, opt, 0, 2)
    sd = opt.state_dict()
    qs, opt2 = _setup(None)
    with pytest.raises(ValueError, match='generator'):
        opt2.load_state_dict(sd)


def test_state_dict_is_loadable_twice_and_not_aliased(tmp_path):
    "Loading copies: stepping the loaded optimizer does not change the state dict it was loaded from."
    ps, opt = _setup()
    _steps(ps, opt, 0, 3)
    torch.save(opt.state_dict(), tmp_path / 'a.pt')
    sd = torch.load(tmp_path / 'a.pt')
    ref = {i: {k: v.clone() for k, v in s.items()} for i, s in sd['state'].items()}
    qs, opt2 = _setup()
    opt2.load_state_dict(sd)
    _steps(qs, opt2, 3, 6)
    for i, s in sd['state'].items():
        for k, v in s.items(): assert torch.equal(v, ref[i][k]), (i, k)
    qs3, opt3 = _setup()
    opt3.load_state_dict(sd)
    assert int(opt3.state[qs3[0]]['step']) == 3


@pytest.mark.parametrize('private', [False, True])
def test_rewind_same_optimizer(tmp_path, private):
    """Loading an earlier checkpoint into the *same* optimizer (a rewind, e.g. back to the best checkpoint) continues
    exactly like the original timeline: the support refreshes after the rewind happen at steps 1, T+1, 2T+1, ..."""
    ps, opt = _setup(torch.Generator().manual_seed(5) if private else None)  # T = 3 (refresh at 1, 4, 7, 10) and T = 2
    _steps(ps, opt, 0, 5)
    torch.save(dict(opt=opt.state_dict(), params=[p.detach().clone() for p in ps], rng=torch.get_rng_state()),
               tmp_path / 'ckpt.pt')
    _steps(ps, opt, 5, 9)  # original timeline: steps 6..9 (refreshes at 7 for T = 3, at 7 and 9 for T = 2)
    first = [p.detach().clone() for p in ps]
    first_S = opt.state[ps[0]]['grad_support'].clone()
    ckpt = torch.load(tmp_path / 'ckpt.pt')
    with torch.no_grad():
        for p, p0 in zip(ps, ckpt['params']): p.copy_(p0)
    opt.load_state_dict(ckpt['opt'])
    torch.set_rng_state(ckpt['rng'])
    _steps(ps, opt, 5, 9)  # the same steps again
    assert torch.equal(opt.state[ps[0]]['grad_support'], first_S)
    for p, q in zip(ps, first): assert torch.equal(p, q)
