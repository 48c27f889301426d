"""Tucker ranks for a ratio: the candidates (same budget, error bound within the slack of the default pair's) and
the choice timed per machine on a CPU (ops/tucker/ranks.py), what turns it off, and its cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tnkernels import TuckerConv2d
from tnkernels.decompose import (
    tucker_num_params,
    tucker_rank_candidates,
    tucker_rank_frontier,
    tucker_ranks_for_ratio,
)
from tnkernels.ops.tucker import ranks
from tnkernels.plan.calibrate import machine_key

CONV = ((1, 1), (1, 1), (1, 1))


def _bound(w: torch.Tensor, pair) -> float:
    """The HOSVD error bound, squared singular values past each rank, from scratch."""
    w = w.double()
    s_out = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    s_in = torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1))
    return math.sqrt(float(s_out[pair[0] :].square().sum() + s_in[pair[1] :].square().sum()))


@pytest.mark.parametrize("shape,ratio", [((64, 64, 3, 3), 2), ((48, 24, 3, 3), 4), ((32, 16, 1, 1), 2)])
def test_candidates_reach_the_ratio_within_the_error_slack(shape, ratio):
    torch.manual_seed(0)
    w = torch.randn(shape)
    with torch.no_grad():  # a decaying spectrum on the output channels, as trained kernels have
        w *= torch.logspace(0, -1, shape[0])[:, None, None, None]
    found = tucker_rank_candidates(w, ratio)
    assert found[0] == tucker_ranks_for_ratio(shape, ratio) and len(found) == len(set(found)) <= 9
    assert set(found) <= set(tucker_rank_frontier(shape, ratio))
    budget = math.prod(shape) / ratio
    assert all(tucker_num_params(shape, p) <= budget for p in found)
    limit = _bound(w, found[0]) * 1.05 + 1e-9
    assert all(_bound(w, p) <= limit for p in found)
    assert len(tucker_rank_candidates(w, ratio, error_slack=0.0)) <= len(found)


def test_the_fastest_candidate_is_taken_and_kept(tucker_timing, monkeypatch):
    calls = []

    def fake_measure(shape, conv, pairs, dtype):  # the default pair twice as slow as the others
        calls.append(pairs)
        return {p: 2.0 if p == pairs[0] else 1.0 for p in pairs}

    monkeypatch.setattr(ranks, "_measure", fake_measure)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    candidates = tucker_rank_candidates(conv.weight, 2)
    default = tucker_ranks_for_ratio(tuple(conv.weight.shape), 2)
    assert TuckerConv2d.from_conv(conv, ratio=2).ranks == default and not calls  # opt-in: the default times nothing
    layer = TuckerConv2d.from_conv(conv, ratio=2, prefer="speed")
    assert len(calls) == 1 and calls[0] == tucker_rank_frontier((32, 32, 3, 3), 2)  # the whole frontier, timed
    assert layer.ranks == candidates[1]  # all others tie: the most accurate of them
    assert layer.num_weight_params <= conv.weight.numel() / 2
    other = nn.Conv2d(32, 32, 3, padding=1)  # another kernel of the shape shares the timings
    assert TuckerConv2d.from_conv(other, ratio=2, prefer="speed").ranks == tucker_rank_candidates(other.weight, 2)[1]
    assert len(calls) == 1
    stored = json.loads((tucker_timing / "tucker_ranks-v2.json").read_text())
    assert list(stored) == [machine_key()]
    monkeypatch.setattr(ranks, "_MEMO", {})  # a new process reads the disk
    assert TuckerConv2d.from_conv(conv, ratio=2, prefer="speed").ranks == layer.ranks and len(calls) == 1
    assert TuckerConv2d.from_conv(conv, ratio=2, prefer="accuracy").ranks == default and len(calls) == 1


def test_real_timing_times_the_whole_frontier_and_stores_it(tucker_timing):
    """No mock: every frontier pair gets a positive time, kept on disk, and the choice is what `pick` makes of them."""
    w = torch.randn(16, 16, 3, 3)
    pair = ranks.choose_tucker_ranks(w, 2, CONV, prefer="speed")
    seconds = ranks.frontier_seconds((16, 16, 3, 3), 2, CONV, torch.float32)  # read back, not measured again
    assert set(seconds) == set(tucker_rank_frontier((16, 16, 3, 3), 2)) and all(t > 0 for t in seconds.values())
    candidates = tucker_rank_candidates(w, 2)
    assert pair == ranks.pick(candidates, {p: seconds[p] for p in candidates})
    stored = json.loads((tucker_timing / "tucker_ranks-v2.json").read_text())[machine_key()]
    assert len(stored) == 1 and len(next(iter(stored.values()))) == len(seconds)


def test_off_switch_and_bad_prefer(monkeypatch):
    monkeypatch.setattr(ranks, "_measure", lambda *a: pytest.fail("timed although tuning is off"))
    conv = nn.Conv2d(32, 32, 3)
    assert TuckerConv2d.from_conv(conv, ratio=2, prefer="speed").ranks == tucker_ranks_for_ratio((32, 32, 3, 3), 2)
    with pytest.raises(ValueError, match="prefer must be 'speed' or 'accuracy', with ratio="):
        TuckerConv2d.from_conv(conv, ratio=2, prefer="fast")
    with pytest.raises(ValueError, match="with ratio="):
        TuckerConv2d.from_conv(conv, ranks=(4, 4), prefer="speed")


def test_pick_keeps_the_default_unless_clearly_slower_then_prefers_accuracy():
    cands = [(38, 38), (36, 41), (40, 37), (48, 30)]  # the default first, then by error bound
    assert ranks.pick(cands, {(38, 38): 1.0, (36, 41): 0.95, (40, 37): 0.9, (48, 30): 0.88}) == (38, 38)  # < 15%
    timed = {(38, 38): 1.0, (36, 41): 0.9, (40, 37): 0.65, (48, 30): 0.6}
    assert ranks.pick(cands, timed) == (40, 37)  # within 10% of the fastest and more accurate than (48, 30)
    assert ranks.pick(cands, {**timed, (40, 37): 0.7}) == (48, 30)
