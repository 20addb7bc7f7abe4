"The packed one-pass-per-group step must give exactly the per-tensor step's results."
import pytest, torch
from so_tutorial.optim import SO

SHAPES = [(40, 30), (64,), (3, 4, 5, 6), (25, 25)]

def run(batched, dtype, steps=40, missing=True, **kw):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    opt = SO(ps if batched else [dict(params=[p]) for p in ps], **kw)  # one group per tensor: each stepped alone
    for t in range(steps):
        for i, p in enumerate(ps):
            # tensor i misses its gradient on some steps, so step counts diverge across tensors
            p.grad = None if (missing and (t + i) % 7 == 0) else torch.randn_like(p)
        torch.manual_seed(1000 + t)
        opt.step()
    return ps, opt

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kw', [dict(density_ratio=0.1, T=3), dict(density_ratio=0.3, T=1, weight_decay=0.05),
                                dict(density_ratio=0.02, T=10, sampler='fast')])
@pytest.mark.parametrize('missing', [False, True])
def test_packed_equals_per_tensor(dtype, kw, missing):
    a, oa = run(True, dtype, missing=missing, **kw)
    b, ob = run(False, dtype, missing=missing, **kw)
    for x, y in zip(a, b): assert torch.equal(x, y)
    for x, y in zip(a, b):
        for key in ('moment_support', 'grad_support', 'exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key

def test_packed_path_is_used_and_state_are_views():
    ps, opt = run(True, torch.float32, steps=3, missing=False, density_ratio=0.1)
    (pk,) = opt._packs.values()
    assert all(opt.state[p]['exp_avg']._base is pk.m for p in ps)

def test_packed_survives_state_dict_round_trip():
    a, oa = run(True, torch.float32, steps=10, missing=False, density_ratio=0.1, T=4)
    sd = oa.state_dict()
    b = [p.detach().clone().requires_grad_() for p in a]
    ob = SO(b, density_ratio=0.1, T=4); ob.load_state_dict(sd)
    for t in range(6):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g): p.grad, q.grad = gi.clone(), gi.clone()
        torch.manual_seed(t); oa.step()
        torch.manual_seed(t); ob.step()
    for x, y in zip(a, b): assert torch.equal(x, y)

@pytest.mark.parametrize('sampler', ['randperm', 'fast'])
def test_slots_kept_between_refreshes_equal_a_fresh_merge(sampler):
    "Between draws the pack keeps its candidate slots; their live coordinates and moments are those of a fresh merge."
    from so_tutorial.optim import _Slots, _merge
    torch.manual_seed(0)
    ps = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = SO(ps, density_ratio=0.1, T=4, sampler=sampler)
    kept, prev = 0, None
    for t in range(24):
        for p in ps: p.grad = torch.randn_like(p).round() if t % 3 == 0 else torch.randn_like(p)  # ties in |m| too
        opt.step()
        (pk,) = opt._packs.values()
        c = pk.candidates()
        fresh = _Slots(_merge(pk.M.to(pk.key_dtype) + pk.off_S, pk.S.to(pk.key_dtype) + pk.off_S), pk)
        alive, alive_fresh = c.in_M | c.in_S, fresh.in_M | fresh.in_S
        for key in ('local', 'm', 'v', 'g_src'): assert torch.equal(getattr(c, key)[alive], getattr(fresh, key)[alive_fresh]), key
        assert int(c.in_M.sum()) == pk.K
        if t % 4: assert c is prev  # no merge between draws (steps 1, 5, 9, ... draw)
        else: assert c is not prev
        kept += c is prev
        prev = c
    assert kept == 18

def test_blocks_group_equal_k():
    torch.manual_seed(0)
    shapes = [(30, 10), (10, 30), (20,), (15, 20), (60,)]  # k = 30, 30, 2, 30, 6 at density 0.1
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    opt = SO(ps, density_ratio=0.1)
    for p in ps: p.grad = torch.randn_like(p)
    opt.step()
    (pk,) = opt._packs.values()
    assert pk.ks == [2, 6, 30, 30, 30] and [(b - a) // (2 * k) for a, b, k in pk.blocks] == [1, 1, 3]
