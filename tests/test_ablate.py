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
