"""SO against the contract every torch.optim optimizer keeps (state dicts, hooks, copies, schedulers, groups, dtypes,
layouts, bad input). Each test either checks that SO behaves like torch's Adam, or pins down a documented deviation and
says why it exists."""
import copy, pickle, warnings

import pytest
import torch
from torch import nn

from so_tutorial.optim import SO
from so_tutorial.viz import TrackedSO
from test_optim import make_params as pair  # two identical lists of leaf parameters

F64 = torch.float64


def feed(ps, qs, gen, dtype=None):
    "The same random gradient for both lists."
    for p, q in zip(ps, qs):
        g = torch.randn(p.shape, generator=gen, dtype=dtype or p.dtype)
        p.grad, q.grad = g.clone(), g.clone()


def run_steps(opt, ps, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for s in range(steps):
        for p in ps: p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        torch.manual_seed(1000 + s)
        opt.step()


# ---------------------------------------------------------------- state_dict round trip and continuation

@pytest.mark.parametrize('sampler', ['randperm', 'fast'])
def test_state_dict_round_trip_continues_identically(sampler):
    shapes = [(10, 8), (30,), (4, 3, 5)]
    a, b = pair(shapes)
    groups = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], dense=True, weight_decay=0.1)]
    kw = dict(lr=1e-2, density_ratio=0.2, T=3, sampler=sampler)
    oa = SO(groups(a), generator=torch.Generator().manual_seed(4), **kw)
    run_steps(oa, a, 5, seed=1)
    sd = pickle.loads(pickle.dumps(oa.state_dict()))  # through bytes, as a checkpoint would
    with torch.no_grad():
        for p, q in zip(a, b): q.copy_(p)
    ob = SO(groups(b), generator=torch.Generator(), **kw)
    ob.load_state_dict(sd)
    assert ob.state_dict()['param_groups'] == oa.state_dict()['param_groups']
    run_steps(oa, a, 7, seed=2); run_steps(ob, b, 7, seed=2)
    for p, q in zip(a, b): assert torch.equal(p, q)


def test_state_dict_has_torch_layout():
    p = nn.Parameter(torch.randn(20, 5))
    opt = SO([p], density_ratio=0.1)
    p.grad = torch.randn(20, 5); opt.step()
    sd = opt.state_dict()
    assert set(sd) == {'state', 'param_groups'} and sd['param_groups'][0]['params'] == [0]
    assert set(sd['state'][0]) == {'step', 'exp_avg', 'exp_avg_sq', 'grad_support', 'moment_support'}


# ---------------------------------------------------------------- hooks

def test_step_hooks_are_called_in_order():
    p = nn.Parameter(torch.randn(10, 10))
    opt = SO([p], density_ratio=0.1)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kw: calls.append(('pre', int(o.state[p]['step']) if o.state else 0)))
    h2 = opt.register_step_post_hook(lambda o, args, kw: calls.append(('post', int(o.state[p]['step']))))
    for _ in range(2):
        p.grad = torch.randn(10, 10); opt.step()
    assert calls == [('pre', 0), ('post', 1), ('pre', 1), ('post', 2)]
    h1.remove(); h2.remove()
    p.grad = torch.randn(10, 10); opt.step()
    assert len(calls) == 4


def test_state_dict_and_load_hooks():
    p = nn.Parameter(torch.randn(10, 10))
    opt = SO([p], density_ratio=0.1)
    p.grad = torch.randn(10, 10); opt.step()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append('sd pre'))
    opt.register_state_dict_post_hook(lambda o, sd: (seen.append('sd post'), dict(sd, note='hooked'))[1])
    sd = opt.state_dict()
    assert sd['note'] == 'hooked' and seen == ['sd pre', 'sd post']
    opt.register_load_state_dict_pre_hook(lambda o, sd: (seen.append('load pre'), {k: v for k, v in sd.items() if k != 'note'})[1])
    opt.register_load_state_dict_post_hook(lambda o: seen.append('load post'))
    opt.load_state_dict(sd)
    assert seen[-2:] == ['load pre', 'load post']


def test_prune_hook_sees_candidates_and_can_be_removed():
    p = nn.Parameter(torch.randn(10, 10))
    opt = SO([p], density_ratio=0.1, T=2)
    seen = []
    h = opt.register_prune_hook(lambda o, q, idx, live, m, kept: seen.append((q is p, idx.numel(), int(kept.sum()))))
    p.grad = torch.randn(10, 10); opt.step()
    h.remove()
    p.grad = torch.randn(10, 10); opt.step()
    assert seen == [(True, 20, 10)]


# ---------------------------------------------------------------- deepcopy and pickle

@pytest.mark.parametrize('cls', [SO, TrackedSO])
@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copies_continue_like_the_original(cls, how):
    ps = [nn.Parameter(torch.randn(s, dtype=F64)) for s in [(12, 10), (40,)]]
    opt = cls(ps, lr=1e-2, density_ratio=0.2, T=3, generator=torch.Generator().manual_seed(7))
    run_steps(opt, ps, 4, seed=3)
    if how == 'deepcopy': twin = copy.deepcopy(opt)
    else: twin = pickle.loads(pickle.dumps(opt))
    qs = [q for g in twin.param_groups for q in g['params']]
    assert all(q is not p and torch.equal(q, p) for p, q in zip(ps, qs))
    run_steps(opt, ps, 5, seed=4); run_steps(twin, qs, 5, seed=4)
    for p, q in zip(ps, qs): assert torch.equal(p, q)
    if cls is TrackedSO: assert twin.support(qs[0])['changed'] is not None and torch.equal(
        twin.support(qs[0])['changed'], opt.support(ps[0])['changed'])


# ---------------------------------------------------------------- schedulers

@pytest.mark.parametrize('make', [lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5),
                                  lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
                                  lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t))],
                         ids=['StepLR', 'Cosine', 'LambdaLR'])
def test_schedulers_drive_lr_like_adam(make):
    a, b = pair([(6, 5), (7,)])
    oa, ob = SO(a, lr=1e-2, density_ratio=1.0, T=1), torch.optim.Adam(b, lr=1e-2)
    sa, sb = make(oa), make(ob)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        feed(a, b, gen); oa.step(); ob.step(); sa.step(); sb.step()
        assert oa.param_groups[0]['lr'] == ob.param_groups[0]['lr']
    for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_one_cycle_cycles_betas():
    "OneCycleLR with cycle_momentum=True writes betas[0] every step; SO reads the group's betas at every step."
    a, b = pair([(6, 5)])
    oa, ob = SO(a, lr=1e-2, density_ratio=1.0, T=1), torch.optim.Adam(b, lr=1e-2)
    sa = torch.optim.lr_scheduler.OneCycleLR(oa, max_lr=5e-2, total_steps=20)
    sb = torch.optim.lr_scheduler.OneCycleLR(ob, max_lr=5e-2, total_steps=20)
    gen, b1s = torch.Generator().manual_seed(0), set()
    for _ in range(20):
        feed(a, b, gen); oa.step(); ob.step(); sa.step(); sb.step()
        b1s.add(oa.param_groups[0]['betas'][0])
        assert oa.param_groups[0]['betas'] == ob.param_groups[0]['betas']
    assert len(b1s) > 5
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- param groups

def test_groups_with_their_own_lr_and_weight_decay():
    a, b = pair([(6, 5), (8,), (3, 3)])
    spec = lambda ps: [dict(params=[ps[0]], lr=3e-2, weight_decay=0.1), dict(params=[ps[1]]), dict(params=[ps[2]], lr=1e-3)]
    oa = SO(spec(a), lr=1e-2, density_ratio=1.0, T=1)
    ob = torch.optim.Adam(spec(b), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(15): feed(a, b, gen); oa.step(); ob.step()
    for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_params_without_grads_are_left_alone():
    ps = [nn.Parameter(torch.randn(10, 10)) for _ in range(3)]
    opt = SO([dict(params=ps[:2]), dict(params=ps[2:], dense=True)], density_ratio=0.1)
    before = [p.detach().clone() for p in ps]
    assert opt.step() is None and not opt.state  # nothing has a gradient
    ps[0].grad = torch.randn(10, 10)
    opt.step()
    assert not torch.equal(ps[0], before[0]) and torch.equal(ps[1], before[1]) and torch.equal(ps[2], before[2])
    assert set(opt.state) == {ps[0]}


def test_empty_group_and_add_param_group():
    p, q = nn.Parameter(torch.randn(10, 10)), nn.Parameter(torch.randn(5, 5))
    opt = SO([dict(params=[])], density_ratio=0.1)
    opt.add_param_group(dict(params=[p]))
    opt.add_param_group(dict(params=[q], dense=True, lr=0.5))
    assert [g['dense'] for g in opt.param_groups] == [False, False, True] and opt.param_groups[2]['lr'] == 0.5
    p.grad, q.grad = torch.randn(10, 10), torch.randn(5, 5)
    opt.step()
    assert int(opt.state[p]['step']) == 1 and opt.state[q]['exp_avg'].shape == q.shape


# ---------------------------------------------------------------- tensor learning rates

@pytest.mark.parametrize('shape', [(), (1,), (1, 1)], ids=['0d', '1', '1x1'])
@pytest.mark.parametrize('dense', [False, True])
@pytest.mark.parametrize('n_params', [1, 3])
def test_tensor_lr(shape, dense, n_params):
    a, b = pair([(4, 5)] * n_params)
    oa = SO(a, lr=torch.full(shape, 1e-2, dtype=F64), density_ratio=1.0, T=1, dense=dense)
    ob = torch.optim.Adam(b, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for s in range(6):
        if s == 3:  # a skipped tensor gets its own step count: per-slot bias corrections with a tensor lr
            a[0].grad = b[0].grad = None
            for p, q in zip(a[1:], b[1:]): g = torch.randn(p.shape, generator=gen, dtype=F64); p.grad, q.grad = g.clone(), g.clone()
        else: feed(a, b, gen)
        oa.step(); ob.step()
    for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_multi_element_tensor_lr_is_refused():
    with pytest.raises(ValueError, match='1-element'): SO([nn.Parameter(torch.randn(3))], lr=torch.tensor([1e-3, 1e-3]))
    opt = SO([nn.Parameter(torch.randn(3, 3))], density_ratio=0.5)
    opt.param_groups[0]['lr'] = torch.tensor([1e-3, 2e-3])  # set after construction: refused at the step
    opt.param_groups[0]['params'][0].grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match='1-element'): opt.step()


# ---------------------------------------------------------------- complex parameters

@pytest.mark.parametrize('how', ['sparse_density_1', 'dense_group'])
def test_complex_params_match_adam(how):
    a, b = pair([(10, 5), (7,)], dtype=torch.complex128)
    kw = dict(density_ratio=1.0, T=1) if how == 'sparse_density_1' else dict(dense=True)
    oa, ob = SO(a, lr=1e-3, weight_decay=0.01, **kw), torch.optim.Adam(b, lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5): feed(a, b, gen); oa.step(); ob.step()
    for p, q in zip(a, b): torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    st = oa.state[a[0]]
    assert st['exp_avg_sq'].dtype == torch.float64 and (st['exp_avg_sq'] >= 0).all()


def test_complex_k_counts_the_real_view():
    p = nn.Parameter(torch.randn(10, 5, dtype=torch.complex64))
    opt = SO([p], density_ratio=0.1)
    p.grad = torch.randn(10, 5, dtype=torch.complex64)
    before = torch.view_as_real(p).detach().clone()
    opt.step()
    assert opt.state[p]['moment_support'].numel() == 10  # 100 real entries
    assert int((torch.view_as_real(p) != before).sum()) == 10


# ---------------------------------------------------------------- non-contiguous parameters

def test_channels_last_conv_matches_adam():
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 8, 3).double(), nn.Conv2d(4, 8, 3).double()
    b.load_state_dict(a.state_dict())
    a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    assert not a.weight.is_contiguous()
    oa, ob = SO(a.parameters(), lr=1e-2, density_ratio=1.0, T=1), torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(2, 4, 8, 8, dtype=F64).to(memory_format=torch.channels_last)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad(); m(x).square().sum().backward(); o.step()
    for p, q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert a.weight.stride() == b.weight.stride()  # the layout is kept


def test_strided_params_train_like_their_contiguous_copies():
    "At a low density, a channels_last weight and a transposed view take exactly the steps of contiguous copies."
    torch.manual_seed(0)
    w4, w2 = torch.randn(8, 4, 3, 3, dtype=F64), torch.randn(7, 6, dtype=F64)
    strided = [nn.Parameter(w4.clone().to(memory_format=torch.channels_last)), nn.Parameter(w2.clone().t().contiguous().t())]
    plain = [nn.Parameter(w4.clone()), nn.Parameter(w2.clone())]
    assert not any(p.is_contiguous() for p in strided)
    oa, ob = (SO(ps, lr=1e-2, density_ratio=0.2, T=2, weight_decay=0.1) for ps in (strided, plain))
    gen = torch.Generator().manual_seed(5)
    for s in range(6):
        for p, q in zip(strided, plain):
            g = torch.randn(q.shape, generator=gen, dtype=F64)
            p.grad, q.grad = g.clone(), g.clone()
        torch.manual_seed(s); oa.step()
        torch.manual_seed(s); ob.step()
    for p, q in zip(strided, plain):
        assert torch.equal(p, q)
        assert torch.equal(oa.state[p]['moment_support'], ob.state[q]['moment_support'])


def test_parameters_sharing_memory_are_refused():
    base = torch.randn(3, 1, dtype=F64)
    p = nn.Parameter(base.expand(3, 4))  # every row repeats one number
    opt = SO([p], density_ratio=0.5)
    p.grad = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match='share memory'): opt.step()


# ---------------------------------------------------------------- error inputs

@pytest.mark.parametrize('kw,name', [(dict(lr=-1.0), 'lr'), (dict(lr=float('nan')), 'lr'), (dict(eps=-1e-8), 'eps'),
                                     (dict(betas=(0.9,)), 'betas'), (dict(betas=(0.9, 1.5)), 'betas'),
                                     (dict(weight_decay=-1.0), 'weight_decay'), (dict(density_ratio=5), 'density_ratio'),
                                     (dict(T=0), 'T'), (dict(sampler='gumbel'), 'sampler'), (dict(dense='yes'), 'dense')])
def test_bad_hyperparameters(kw, name):
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=name): SO([p], **kw)


def test_rejected_group_leaves_param_groups_unchanged():
    p, q = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    opt = SO([p])
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups])
    with pytest.raises(ValueError, match='density_ratio'): opt.add_param_group(dict(params=[q], density_ratio=2.0))
    assert len(opt.param_groups) == 1 and [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups] == groups
    opt.add_param_group(dict(params=[q]))  # and the same tensor can still be added correctly
    assert len(opt.param_groups) == 2


def test_torch_checks_are_kept():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match='twice'): SO([p, p])  # torch only warns; SO would update it twice
    with pytest.raises(ValueError): SO([dict(params=[p]), dict(params=[p])])  # one parameter in two groups
    with pytest.raises(ValueError, match='non-leaf'): SO([p * 2])


# ---------------------------------------------------------------- torch.compile

def test_compiled_training_step_has_no_graph_break_in_so():
    "Between refreshes, dynamo traces SO's step without a graph break (no .item(), int(tensor) or data-dependent shape)."
    import torch._dynamo
    torch._dynamo.reset()
    lin = nn.Linear(16, 16)
    opt = SO(lin.parameters(), lr=1e-2, density_ratio=0.1, T=4)
    x = torch.randn(4, 16)

    def train(x):
        opt.zero_grad()
        lin(x).sum().backward()
        opt.step()

    train(x); train(x)  # steps 1 and 2; step 3 is between refreshes
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        report = torch._dynamo.explain(train)(x)
    in_so = [r for r in report.break_reasons if any('so_tutorial' in f.filename for f in r.user_stack)]
    assert not in_so, [r.reason for r in in_so]


@pytest.mark.parametrize('sampler', ['randperm', 'fast'])
def test_compiled_training_step_matches_eager(sampler):
    """A compiled training step (refresh steps included: the draws run eagerly) gives the eager parameters.
    Deviation: SO's step counts are Python numbers, so dynamo specialises the step on them and compiles it again for
    each step count; past torch's recompile limit that frame runs eagerly. The result is the same either way."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.load_state_dict(a.state_dict())
    oa, ob = (SO(m.parameters(), lr=1e-2, density_ratio=0.1, T=3, sampler=sampler, generator=torch.Generator().manual_seed(1))
              for m in (a, b))

    def train(m, o, x):
        o.zero_grad(); m(x).square().sum().backward(); o.step()

    compiled = torch.compile(train, backend='eager')
    for _ in range(8):
        x = torch.randn(4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            compiled(a, oa, x)
        train(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)


# ---------------------------------------------------------------- documented deviations from torch's Adam

def test_deviation_grad_is_freed_in_sparse_groups_also_for_k0():
    """Deviation: SO sets `.grad = None` after the step for every tensor of a sparse group, also those with k = 0 that
    it never changes (the paper's code does the same: it only reads 2k entries). Dense groups keep their gradients."""
    big, tiny, bias = nn.Parameter(torch.randn(100, 10)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(10))
    opt = SO([dict(params=[big, tiny]), dict(params=[bias], dense=True)], density_ratio=0.01)
    for p in (big, tiny, bias): p.grad = torch.randn(p.shape)
    with pytest.warns(UserWarning, match='never updated'): opt.step()
    assert big.grad is None and tiny.grad is None and bias.grad is not None


def test_deviation_shared_global_generator():
    """Deviation: two SO optimizers that both draw from the global generator interleave their draws, so each one's
    supports depend on the other (Adam has no randomness). Give each its own `generator=` to make them independent."""
    def run(interleave, private):
        ps, qs = [nn.Parameter(torch.randn(20, 20)) for _ in range(2)]
        gens = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)) if private else (None, None)
        o1, o2 = (SO([x], density_ratio=0.05, T=1, generator=g) for x, g in zip((ps, qs), gens))  # T=1: a draw every step
        torch.manual_seed(0)
        ps.grad = torch.ones(20, 20); o1.step()
        if interleave: qs.grad = torch.ones(20, 20); o2.step()
        ps.grad = torch.ones(20, 20); o1.step()
        return o1.state[ps]['moment_support'].clone(), o1.state[ps]['grad_support'].clone()
    assert not all(torch.equal(x, y) for x, y in zip(run(False, False), run(True, False)))  # shared: o2's draw moves o1's
    assert all(torch.equal(x, y) for x, y in zip(run(False, True), run(True, True)))  # private generators: independent


def test_deviation_no_foreach_fused_capturable_flags():
    """Deviation: SO has no `foreach`, `fused`, `capturable`, `differentiable` or `maximize` options: it always packs
    the tensors of a group (its own kind of foreach), keeps step counts on the host, and minimises."""
    for flag in ('foreach', 'fused', 'capturable', 'differentiable', 'maximize'):
        with pytest.raises(TypeError): SO([nn.Parameter(torch.randn(3))], **{flag: True})
