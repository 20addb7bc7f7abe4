"The mechanism recorders of viz: slot accounting, new entrants, the moment contest and the update mass, on hand-built and real steps."
from types import SimpleNamespace
import numpy as np, pytest, torch
from torch import nn
from so_tutorial.viz import (MechanismRecorder, TrackedSO, slot_accounting, last_entry_step, contest, contest_traces, first_in_M,
                             pick_contestants, update_mass, first_step_size, plot_slot_accounting, plot_contest, plot_update_mass)


def test_slot_accounting_hand_built():
    "Two steps on 8 coordinates, k = 2: M = S = {0, 1}, then S = {2, 3} and the prune keeps {0, 2}."
    t = torch.tensor
    rec = SimpleNamespace(numel=8, k=2, T=1, records=[dict(step=1, S=t([0, 1]), M=t([0, 1])), dict(step=2, S=t([2, 3]), M=t([0, 2]))])
    sa = slot_accounting(rec)
    assert sa.S_and_M.tolist() == [2, 1] and sa.M_only.tolist() == [0, 1] and sa.new_entrants.tolist() == [2, 1]
    assert sa.chance.tolist() == [0.5, 0.5] and last_entry_step(sa) == 2


class Tiny(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8, generator=gen, dtype=torch.float64))


@pytest.fixture(scope='module')
def run():
    "12 steps of SO (k = 12 of 48, T = 3) on a least-squares problem whose gradient shrinks; the gradients and weights seen at each step."
    gen = torch.Generator().manual_seed(0)
    model = Tiny(gen)
    x, y = torch.randn(16, 8, generator=gen, dtype=torch.float64), torch.randn(16, 6, generator=gen, dtype=torch.float64)
    opt = TrackedSO([model.w], lr=0.05, density_ratio=0.25, T=3, generator=torch.Generator().manual_seed(1))
    rec = MechanismRecorder('w', model.w)
    grads, weights = [], [model.w.detach().clone()]
    for t in range(1, 13):
        opt.zero_grad()
        (((x @ model.w.T - y) ** 2).mean() * 0.7 ** t).backward()
        grads.append(model.w.grad.detach().flatten().clone())
        opt.step(); rec(t, model, opt); weights.append(model.w.detach().clone())
    return rec, grads, weights


def test_slots_sum_to_k_and_entrants_counted(run):
    rec = run[0]
    sa = slot_accounting(rec)
    assert (sa.S_and_M + sa.M_only == rec.k).all()
    before = set()
    for r, (step, row) in zip(rec.records, sa.iterrows()):
        M, S = set(r['M'].tolist()), set(r['S'].tolist())
        assert row.new_entrants == len(M - before) and row.S_and_M == len(M & S)
        before = M
    assert sa.new_entrants.iloc[0] == rec.k


def test_update_mass_parts_sum_to_total(run):
    rec, _, weights = run
    um = update_mass(rec)
    total = [(b - a).abs().sum().item() for a, b in zip(weights, weights[1:])]
    assert np.allclose(um.total, total, rtol=1e-12, atol=0)
    assert np.allclose(um.S_only + um.S_and_M + um.M_only, um.total, rtol=1e-12, atol=1e-15)
    assert um.S_and_M.iloc[0] == 0 and um.M_only.iloc[0] == 0  # step 1: every moving coordinate is fresh
    assert (um.S_only.iloc[1:rec.T] == 0).all() and (um.M_only.iloc[rec.T:] > 0).all()  # until the first redraw S = M


def test_contest_threshold_and_entry_level(run):
    rec, grads, _ = run
    ct, b1, before = contest(rec), rec.records[-1]['betas'][0], set()
    for r, g, (step, row) in zip(rec.records, grads, ct.iterrows()):
        kept = r['cand_abs'][r['cand_kept']]
        assert row.threshold == kept.min().item() == r['m_abs'].min().item()
        assert r['evicted_abs'].numel() == 0 or r['evicted_abs'].max() <= row.threshold
        fresh = torch.tensor([c not in before for c in r['cand'].tolist()])
        if fresh.any():  # a fresh candidate enters with |m| = (1 - b1)|g|
            assert torch.allclose(r['cand_abs'][fresh], (1 - b1) * g[r['cand'][fresh]].abs(), rtol=1e-12, atol=0)
            assert row.fresh_best == r['cand_abs'][fresh].max().item()
        before = set(r['M'].tolist())


def test_contest_traces_and_contestants(run):
    rec = run[0]
    who = pick_contestants(rec, losers=1)
    first, final = first_in_M(rec), rec.records[-1]
    assert first[who['early winner']] == 1 and who['early winner'] in final['M'].tolist()
    assert all(who['early winner'] in r['M'].tolist() for r in rec.records)  # in M after every step
    assert who['late winner'] in final['M'].tolist() and first[who['late winner']] == first[final['M']].max()
    loser = [c for k, c in who.items() if k.startswith('S-only')]
    assert len(loser) == 1 and first[loser[0]] == 0
    m, inS = contest_traces(rec, who.values())
    c = who['early winner']
    assert m.loc[len(rec.records), c] == final['m_abs'][final['M'] == c].item()
    assert inS[c].tolist() == [c in r['S'].tolist() for r in rec.records]
    assert m[loser[0]].notna().sum() >= 1 and m[loser[0]].notna().tolist() == inS[loser[0]].tolist()


def test_plots_draw_what_they_say(run):
    rec = run[0]
    fig = plot_slot_accounting(rec)
    assert f'last new entrant to M at step {last_entry_step(slot_accounting(rec))}' in fig.axes[0].get_title()
    fig = plot_contest(rec)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(l.startswith('early winner') for l in labels) and any('threshold' in l for l in labels)
    assert plot_update_mass(rec).axes[0].get_title().startswith('w: over the second half')


def test_update_mass_counts_and_first_step(run):
    rec = run[0]
    um, b = update_mass(rec), rec.records[-1]['betas']
    assert (um.n_S_only + um.n_S_and_M == rec.k).all() and (um.n_S_and_M + um.n_M_only <= rec.k).all()
    # a fresh coordinate moves by lr · first_step_size(t) whatever its gradient (here lr = 0.05)
    for r, (t, row) in zip(rec.records, um.iterrows()):
        if row.n_S_only: assert np.isclose(row.S_only / row.n_S_only, 0.05 * first_step_size(t, b), rtol=1e-3)  # eps = 1e-8 shifts it a little
    assert first_step_size(1) == 1 and 0.4 < first_step_size(20) < first_step_size(60) < 1
