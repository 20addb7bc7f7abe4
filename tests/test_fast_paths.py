"The CPU fast paths of SO's step give exactly what their plain forms give."
import pytest, torch
import threading
import so_tutorial.optim as O
from so_tutorial.optim import SO, _top_k_rows, _top_k_blocks, _merge_order, _sort_apart, _each, _kept_slots, _merge, _as_float

def _stable_rule(score, k):
    "The k largest of each row, ties to the earlier slot: the first k of a stable descending sort."
    idx = (-score).argsort(dim=1, stable=True)[:, :k]
    return torch.zeros(score.shape, dtype=torch.bool).scatter_(1, idx, True)

@pytest.mark.parametrize('seed', range(5))
def test_top_k_keys_match_stable_sort_rule(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(-3, 4, (7, 40), generator=g).float() / 2  # many ties, negatives, zeros
    score[score == 0] = torch.tensor([0.0, -0.0]).repeat(40)[: int((score == 0).sum())]  # +0 and -0 are equal scores
    score[:, :5] = torch.randn(7, 5, generator=g)
    for k in (1, 7, 20, 39, 40):
        want = _stable_rule(score.double(), k)
        assert torch.equal(_top_k_rows(score, k), want)
        assert torch.equal(_top_k_rows(score.double(), k), want)
        assert (_top_k_rows(score, k).sum(1) == k).all()

@pytest.mark.parametrize('dtype', [torch.int32, torch.int64])
def test_merge_order_matches_torch(dtype, monkeypatch):
    "numpy's merge, whole or in two parts split at a key boundary, is torch's stable argsort of cat([M, S])."
    monkeypatch.setattr(O, '_threads', lambda t: 2)  # split these small inputs as if they were large
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lo, hi = (torch.randperm(500, generator=g)[:int(torch.randint(1, 200, (1,), generator=g))].sort().values for _ in range(2))
        c = min(lo.numel(), hi.numel())
        M = torch.cat([lo[:c], 1000 + hi[:c]]).to(dtype)  # every key before the cut lies below every key after it
        S = torch.cat([lo[-c:], 1000 + hi[-c:]]).to(dtype)
        want = torch.cat([M, S]).argsort(stable=True)
        for cut in (0, c):
            got = _merge_order(M, S, cut)
            assert got.dtype == torch.int64 and torch.equal(got, want), (trial, cut)

def _merge_by_hand(M, S):
    "Slots of M ∪ S one by one: an M copy first, then its S twin (dead), with the sources the step reads."
    K, slots = len(M), []
    for key, src in sorted([(int(x), i) for i, x in enumerate(M)] + [(int(x), K + j) for j, x in enumerate(S)]):
        slots.append([key, min(src, K), src - K if src >= K else K, True])
        if len(slots) > 1 and slots[-2][0] == key:  # the S twin of the M copy before it
            slots[-2][2], slots[-1][2], slots[-1][3] = src - K, K, False
    return [list(x) for x in zip(*slots)]

def test_merge_matches_slots_by_hand():
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        n = int(torch.randint(2, 300, (1,), generator=g)); k = int(torch.randint(1, n // 2 + 1, (1,), generator=g))
        M, S = (torch.randperm(n, generator=g)[:k].sort().values.int() for _ in range(2))
        c = _merge(M, S)
        assert [c.idx.tolist(), c.m_src.tolist(), c.g_src.tolist(), c.live.tolist()] == _merge_by_hand(M, S), trial

def test_sort_apart_matches_stable_sort():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randint(0, 50, (400_000,), generator=g), torch.randint(50, 90, (300_000,), generator=g)]).int()
    want = x.sort(stable=True)
    for cut in (0, 400_000):
        v, o = _sort_apart(x, cut)
        assert torch.equal(v, want.values) and torch.equal(o, want.indices)

def test_each_runs_every_index_once_on_threads():
    seen, names, grad_on = [], set(), []
    def fn(i):
        seen.append(i); names.add(threading.current_thread().name); grad_on.append(torch.is_grad_enabled())
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _each(fn, 40, like=torch.empty(2**20))
        assert sorted(seen) == list(range(40)) and len(names) == 2 and not any(grad_on)
        seen.clear(); names.clear(); _each(fn, 40)  # nothing to size the work by (a GPU, or compiling): one thread
        assert seen == list(range(40)) and names == {threading.current_thread().name}
        def bad(i):
            if i == 7: raise KeyError('seven')
        with pytest.raises(KeyError, match='seven'): _each(bad, 40, like=torch.empty(2**20))
        seen.clear(); names.clear(); _each(fn, 40, like=torch.empty(2**17))  # too little work for a second thread
        assert seen == list(range(40)) and names == {threading.current_thread().name}
        with torch.inference_mode():
            inside = []; _each(lambda i: inside.append(torch.is_inference_mode_enabled()), 4, like=torch.empty(2**20))
        assert inside == [True] * 4
    finally: torch.set_num_threads(old)

def test_each_in_a_forked_child():
    "A forked child has none of the parent's helper threads: _each must make its own instead of waiting forever."
    import os, time
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _each(lambda i: None, 4, like=torch.empty(2**20))  # the parent's pool exists
        pid = os.fork()
        if pid == 0:
            out = []
            _each(out.append, 4, like=torch.empty(2**20))
            os._exit(0 if sorted(out) == [0, 1, 2, 3] else 3)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done: break
            time.sleep(0.05)
        else:
            os.kill(pid, 9); os.waitpid(pid, 0)
            pytest.fail('_each hung in a forked child')
        assert os.waitstatus_to_exitcode(status) == 0
    finally: torch.set_num_threads(old)

def test_top_k_blocks_take_numpys_partition_unless_tied(monkeypatch):
    calls, exact = [], O._top_k_rows
    monkeypatch.setattr(O, '_top_k_rows', lambda x, k: calls.append(k) or exact(x, k))
    x = torch.randn(4, 60, generator=torch.Generator().manual_seed(4))
    y = x.clone(); y[2, :31] = 0.5  # 31 equal scores around the 30th place
    score, blocks = torch.cat([x.view(-1), y.view(-1)]), [(0, 240, 30), (240, 480, 30)]
    keep = _top_k_blocks(score, blocks)
    assert calls == [30]  # only the tied block took the exact rule
    assert torch.equal(keep[:240].view(4, 60), _stable_rule(x, 30)) and torch.equal(keep[240:].view(4, 60), _stable_rule(y, 30))

@pytest.mark.parametrize('seed', range(3))
def test_top_k_blocks_match_stable_rule(seed):
    "numpy's partition where the k-th largest is unique, the exact key rule where it is not (ties): the same masks."
    g = torch.Generator().manual_seed(seed)
    blocks, parts, a = [], [], 0
    for rows, k in ((3, 5), (4, 40), (2, 1), (5, 3000)):
        x = torch.randn(rows, 2 * k, generator=g).abs()
        x[torch.rand(rows, 2 * k, generator=g) < 0.3] = -1.0
        if k > 1: x[0, :k + 1] = 0.25  # a tie across the k-th place
        parts.append(x); blocks.append((a, a + x.numel(), k)); a += x.numel()
    score = torch.cat([x.view(-1) for x in parts])
    keep = _top_k_blocks(score, blocks)
    for x, (a, b, k) in zip(parts, blocks): assert torch.equal(keep[a:b].view(x.shape), _stable_rule(x.double(), k))

def test_kept_slots_paths_agree(monkeypatch):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(5000, generator=g) < 0.5
    K = int(keep.sum())
    fast = _kept_slots(keep, K, torch.arange(5000))
    monkeypatch.setattr(O, '_cpu_eager', lambda t: False)
    assert torch.equal(_kept_slots(keep, K, torch.arange(5000)), fast)

def _run(steps=9, **kw):
    "SO on tensors large enough for threads, with ties, a non-finite gradient and tensors that miss steps."
    torch.manual_seed(0)
    ps = [torch.randn(s, requires_grad=True) for s in [(1024, 640), (640, 1024), (300,), (96, 700)]]
    with torch.no_grad(): ps[0][:3] = -0.0
    opt = SO(ps, generator=torch.Generator().manual_seed(5), **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (t + i) % 5 == 4 else (torch.randn_like(p) * 4).round() / 4  # many equal |g|
        if t == 2: ps[1].grad[::2] = float('nan')
        if t == 5: ps[3].grad[::3] = float('inf')
        opt.step()
    return ps, opt

@pytest.mark.parametrize('kw', [dict(density_ratio=0.2, T=3, sampler='fast'), dict(density_ratio=0.25, T=2, weight_decay=0.1),
                                dict(density_ratio=0.3, T=4, sampler='fast', eps=0.0, lr=torch.tensor(0.01))])
def test_cpu_fast_paths_equal_the_generic_paths(monkeypatch, kw):
    "Bit for bit (signs of zeros included): the CPU's numpy, thread and host-check paths against those a GPU takes."
    bits = lambda t: t.detach().view(torch.int32) if t.dtype == torch.float32 else t
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.warns(UserWarning, match='not finite'): a, oa = _run(**kw)
        monkeypatch.setattr(O, '_cpu_eager', lambda t: False)
        with pytest.warns(UserWarning, match='not finite'): b, ob = _run(**kw)
    finally: torch.set_num_threads(old)
    assert oa.skipped_updates() == ob.skipped_updates() == 2
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))
        for key in ('moment_support', 'grad_support', 'exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(bits(oa.state[x][key]), bits(ob.state[y][key])), key

def test_kept_slots_in_slot_order():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(1000, generator=g) < 0.5
    K = int(keep.sum())
    assert torch.equal(_kept_slots(keep, K, torch.arange(1000)), keep.nonzero().view(-1))

def test_merge_sources():
    M, S = torch.tensor([1, 4, 7, 8], dtype=torch.int32), torch.tensor([2, 4, 8, 9], dtype=torch.int32)
    c = _merge(M, S)
    assert c.idx.tolist() == [1, 2, 4, 4, 7, 8, 8, 9]
    assert c.m_src.tolist() == [0, 4, 1, 4, 2, 3, 4, 4]
    assert c.g_src.tolist() == [4, 0, 1, 4, 4, 2, 4, 3]
    assert c.live.tolist() == [True, True, True, False, True, True, False, True]
    assert c.g_src.dtype == c.m_src.dtype == torch.int64

def test_as_float():
    mask = torch.tensor([True, False, True])
    assert torch.equal(_as_float(mask, torch.float32), mask.float())

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_score_hook_nan_counts_as_zero_on_both_paths(monkeypatch, dtype):
    "A hook's NaN scores count as 0, the same on both paths and for both moment dtypes; the state keeps k entries."
    bits = lambda t: t.view(torch.int32 if t.dtype == torch.float32 else torch.int64) if t.is_floating_point() else t
    def hook(opt, p, keys, live, in_M, m, v):
        s = m.abs() / v.sqrt()  # 0 / 0 where m = v = 0
        s[::7] = float('nan')
        return s
    def run():
        torch.manual_seed(0)
        ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in [(300, 200), (200, 300)]]
        opt = SO(ps, density_ratio=0.1, T=2, sampler='fast', generator=torch.Generator().manual_seed(1))
        opt.register_score_hook(hook)
        for t in range(5):
            for p in ps: p.grad = (torch.randn_like(p) * 2).round() / 2
            opt.step()
        return ps, opt
    a, oa = run()
    monkeypatch.setattr(O, '_cpu_eager', lambda t: False)
    b, ob = run()
    for x, y in zip(a, b):
        assert torch.equal(bits(x.detach()), bits(y.detach()))
        for key in ('moment_support', 'exp_avg', 'exp_avg_sq'):
            assert oa.state[x][key].numel() == 6000 and torch.equal(bits(oa.state[x][key]), bits(ob.state[y][key])), key
