"Tests of the support samplers and of how SO draws its supports (parity with the paper code, private generators)."
import itertools, math
from collections import Counter

import pytest
import torch
from torch import nn
from scipy import stats

from so_tutorial.optim import SO
from so_tutorial.sampling import fast_support, randperm_support


def check_support(s, n, k):
    assert s.dtype == torch.int64
    assert s.shape == (k,)
    assert s.unique().numel() == k
    if k: assert s.min() >= 0 and s.max() < n


# ---------------------------------------------------------------- randperm parity sampler

@pytest.mark.parametrize('n,k', [(1, 1), (10, 3), (100, 100), (1000, 7), (4096, 2)])
def test_randperm_support_is_randperm_prefix(n, k):
    torch.manual_seed(123)
    a = randperm_support(n, k)
    torch.manual_seed(123)
    b = torch.randperm(n)[:k]
    assert torch.equal(a, b)
    check_support(a, n, k)
    a = randperm_support(n, k, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, torch.randperm(n, generator=torch.Generator().manual_seed(5))[:k])


def test_optimizer_draws_like_the_paper_code():
    "One randperm(n)[:k] per sparse tensor per refresh, from the global generator, group then param order, None skipped."
    shapes = [(20, 30), (7, 5, 4), (50,), (9, 11)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    dens = [0.05, 0.1]
    opt = SO([dict(params=ps[:2]), dict(params=ps[2:], density_ratio=dens[1])], density_ratio=dens[0], T=3)
    ks = [int(600 * 0.05), int(140 * 0.05), int(50 * 0.1), int(99 * 0.1)]
    # step 1: the second tensor has no grad and is skipped
    for i, p in enumerate(ps): p.grad = None if i == 1 else torch.randn(p.shape)
    torch.manual_seed(42)
    opt.step()
    torch.manual_seed(42)
    expected = {i: torch.randperm(ps[i].numel())[:ks[i]].sort().values for i in (0, 2, 3)}
    rng_after = torch.get_rng_state()
    for i in (0, 2, 3):
        assert torch.equal(opt.state[ps[i]]['grad_support'], expected[i])
        assert torch.equal(opt.state[ps[i]]['moment_support'], expected[i])  # M := S on the first step
    assert len(opt.state.get(ps[1], {})) == 0
    # exactly those draws were made from the global generator
    torch.manual_seed(42)
    for i in (0, 2, 3): torch.randperm(ps[i].numel())
    assert torch.equal(torch.get_rng_state(), rng_after)
    # step 2: no refresh for the three (mid-period), first draw for the second tensor
    for p in ps: p.grad = torch.randn(p.shape)
    torch.manual_seed(7)
    opt.step()
    torch.manual_seed(7)
    assert torch.equal(opt.state[ps[1]]['grad_support'], torch.randperm(140)[:ks[1]].sort().values)
    for i in (0, 2, 3): assert torch.equal(opt.state[ps[i]]['grad_support'], expected[i])


def test_optimizer_first_support_with_private_generator():
    p = nn.Parameter(torch.randn(40, 25))
    opt = SO([p], density_ratio=0.02, generator=torch.Generator().manual_seed(3))
    p.grad = torch.randn(40, 25)
    opt.step()
    exp = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:20].sort().values
    assert torch.equal(opt.state[p]['grad_support'], exp)


# ---------------------------------------------------------------- fast sampler

FAST_CASES = [(1, 1), (2, 1), (4, 1), (5, 1), (8, 2), (10, 2), (10, 3), (100, 24), (100, 25), (100, 26), (101, 25),
              (100, 99), (100, 100), (7, 7), (1000, 1), (1000, 249), (1000, 250), (1000, 251), (1000, 600),
              (10**6, 10), (10**6, 1000), (2**16 + 3, 16384)]


@pytest.mark.parametrize('n,k', FAST_CASES)
def test_fast_support_valid(n, k):
    gen = torch.Generator().manual_seed(n + k)
    for _ in range(3):
        check_support(fast_support(n, k, generator=gen), n, k)
    torch.manual_seed(0)
    s = fast_support(n, k)
    check_support(s, n, k)
    check_support(s.sort().values, n, k)


def test_fast_support_k_equals_n_is_everything():
    for n in (1, 3, 17, 100):
        assert torch.equal(fast_support(n, n).sort().values, torch.arange(n))


def _subset_counts(n, k, draws, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = Counter(tuple(sorted(fast_support(n, k, generator=gen).tolist())) for _ in range(draws))
    return [counts.get(c, 0) for c in itertools.combinations(range(n), k)], sum(counts.values()), len(counts)


@pytest.mark.parametrize('n,k,draws', [(6, 2, 15000),   # C(6,2) = 15 subsets (4k > n: the randperm fallback)
                                       (8, 2, 14000)])  # C(8,2) = 28 subsets (the fast path: 4k <= n)
def test_fast_support_uniform_over_subsets(n, k, draws):
    obs, total, distinct = _subset_counts(n, k, draws, seed=2024)
    assert total == draws and distinct == math.comb(n, k)  # nothing outside the subsets, every subset occurs
    assert stats.chisquare(obs).pvalue > 1e-3


def test_fast_support_uniform_inclusion():
    n, k, draws = 50, 5, 10000
    gen = torch.Generator().manual_seed(99)
    cnt = torch.zeros(n)
    for _ in range(draws): cnt[fast_support(n, k, generator=gen)] += 1
    assert cnt.sum() == draws * k
    assert stats.chisquare(cnt.numpy()).pvalue > 1e-3
    # and per coordinate: inclusion probability k/n within 5 binomial standard deviations
    p = k / n
    sd = math.sqrt(draws * p * (1 - p))
    assert ((cnt - draws * p).abs() < 5 * sd).all()


def test_fast_support_not_the_first_k():
    "Guards against a degenerate sampler (e.g. always the smallest indices) that would still pass validity checks."
    gen = torch.Generator().manual_seed(0)
    firsts = {tuple(fast_support(1000, 10, generator=gen).sort().values.tolist()) for _ in range(20)}
    assert len(firsts) == 20


# ---------------------------------------------------------------- generators

@pytest.mark.parametrize('sampler', [randperm_support, fast_support])
def test_generator_reproducible_and_independent_of_global(sampler):
    n, k = 5000, 12
    torch.manual_seed(0)
    state0 = torch.get_rng_state()
    a = [sampler(n, k, generator=g) for g in [torch.Generator().manual_seed(11)] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state0)  # the global generator was not touched
    g = torch.Generator().manual_seed(11)
    b = []
    for i in range(3):
        torch.manual_seed(1000 + i); torch.rand(17)  # global draws in between change nothing
        b.append(sampler(n, k, generator=g))
    for x, y in zip(a, b): assert torch.equal(x, y)
    assert not torch.equal(a[0], a[1])
    c = sampler(n, k, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(a[0], c)


def _run(sampler, seed, steps=8, touch_global=False):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in [(30, 40), (500,), (3, 4, 5)]]
    opt = SO([dict(params=ps[:2]), dict(params=ps[2:], density_ratio=0.5, T=2)], lr=1e-2, density_ratio=0.02, T=3,
             sampler=sampler, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in ps: p.grad = torch.randn(p.shape, generator=gen)
        if touch_global: torch.manual_seed(500 + step)
        state = torch.get_rng_state()
        opt.step()
        assert torch.equal(torch.get_rng_state(), state), 'SO with generator= must not use the global generator'
    return ps, opt


@pytest.mark.parametrize('sampler', ['randperm', 'fast'])
def test_private_generator_in_so(sampler):
    ps1, opt1 = _run(sampler, seed=0)
    ps2, opt2 = _run(sampler, seed=0, touch_global=True)
    ps3, _ = _run(sampler, seed=1)
    for p, q in zip(ps1, ps2): assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(ps1, ps3))
    for p, q in zip(ps1, ps2):
        for key in ('grad_support', 'moment_support', 'exp_avg'):
            assert torch.equal(opt1.state[p][key], opt2.state[q][key])
    k = int(1200 * 0.02)
    M = opt1.state[ps1[0]]['moment_support']
    assert M.numel() == k and (M[1:] > M[:-1]).all()


def test_fast_sampler_with_global_generator_is_seeded_by_manual_seed():
    def run(seed):
        p = nn.Parameter(torch.ones(100, 100))
        opt = SO([p], lr=1e-2, density_ratio=0.01, T=2, sampler='fast')
        for s in range(5):
            p.grad = torch.ones(100, 100)
            torch.manual_seed(seed + s)
            opt.step()
        return p
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(100))


# ---------------------------------------------------------------- randperm_prefix: the paper's draw without the permutation

from so_tutorial import parity
from so_tutorial.parity import randperm_prefix


@pytest.mark.parametrize('n', [1, 2, 3, 7, 623, 624, 625, 1000, 4096, 100_003])
def test_randperm_prefix_equals_randperm(n):
    "Same indices as torch.randperm(n)[:k] and the generator left in the same state, from any generator position."
    rng = torch.Generator().manual_seed(n)
    for k in sorted({0, 1, n // 2, n - 1, n, int(torch.randint(0, n + 1, (1,), generator=rng))}):
        if not 0 <= k <= n: continue
        skip = int(torch.randint(0, 700, (1,), generator=rng))
        a, b = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        torch.empty(skip, dtype=torch.uint8).random_(generator=a); torch.empty(skip, dtype=torch.uint8).random_(generator=b)
        want = torch.randperm(n, generator=a)[:k]
        got = randperm_prefix(n, k, generator=b)
        assert got.dtype == torch.int64 and torch.equal(got, want), (n, k)
        assert torch.equal(a.get_state(), b.get_state()), (n, k)


def test_randperm_prefix_global_generator():
    torch.manual_seed(9); want = torch.randperm(5000)[:40]; state = torch.get_rng_state()
    torch.manual_seed(9); got = randperm_prefix(5000, 40)
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), state)


def test_randperm_prefix_falls_back_to_randperm(monkeypatch):
    "If this torch build shuffled differently, every draw goes through torch.randperm (same result, just slower)."
    monkeypatch.setitem(parity._CHECKED, 'ok', False)
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, 'randperm', lambda *a, **kw: calls.append(a) or real(*a, **kw))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(randperm_prefix(300, 7, generator=g1), real(300, generator=g2)[:7]) and calls
    assert torch.equal(g1.get_state(), g2.get_state())


def test_emulation_self_check_passes_on_this_build():
    assert parity._emulation_matches()


# ---------------------------------------------------------------- a group's supports drawn together

@pytest.mark.parametrize('sampler', ['fast', 'randperm'])
def test_group_draws_equal_one_by_one(sampler):
    from so_tutorial.optim import _draw_many
    ns, ks = [50_000, 300, 90, 12_000, 7, 1000], [25, 80, 30, 6, 7, 0 if sampler == 'randperm' else 3]
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    together = _draw_many(ns, ks, sampler, 'cpu', a)
    one = fast_support if sampler == 'fast' else randperm_support
    for S, n, k in zip(together, ns, ks): assert torch.equal(S, one(n, k, generator=b).sort().values), (n, k)
    assert torch.equal(a.get_state(), b.get_state())


def test_group_fast_draws_when_one_tensor_runs_short(monkeypatch):
    "If a tensor's draws hold fewer than k distinct values, fast_support draws more at once: the group draw redoes that."
    from so_tutorial.optim import _fast_supports
    real, trap, patched = torch.randint, {}, []
    def randint(*args, generator=None, **kw):
        before = generator.get_state()
        out = real(*args, generator=generator, **kw)
        if args[-2] - (args[0] if len(args) == 3 else 0) == 5000:  # randint(n, size) or randint(low, high, size)
            trap.setdefault('state', before)
            if torch.equal(before, trap['state']): out[3:] = out[0]; patched.append(1)  # only 4 distinct values
        return out
    monkeypatch.setattr(torch, 'randint', randint)
    ns, ks = [9000, 5000, 30, 20_000], [40, 12, 20, 8]  # the third tensor takes the randperm path (4k > n)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    together = _fast_supports(ns, ks, a)
    one_by_one = [fast_support(n, k, generator=b).sort().values for n, k in zip(ns, ks)]
    assert len(patched) == 3  # the group draw, its redo, the one-by-one draw
    for x, y in zip(together, one_by_one): assert torch.equal(x, y)
    assert torch.equal(a.get_state(), b.get_state())
