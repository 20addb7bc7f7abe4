"The CPU fast paths of SO's step give exactly what their plain forms give."
import pytest, torch
from so_tutorial.optim import _top_k_rows, _stable_argsort, _kept_slots, _merge, _as_float

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

def test_stable_argsort_matches_torch():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 50, (300,), generator=g).unique()[:30].int() for _ in range(2))
    x = torch.cat([a.sort().values, b.sort().values])
    assert torch.equal(_stable_argsort(x), x.argsort(stable=True))
    assert _stable_argsort(x).dtype == torch.int64

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
