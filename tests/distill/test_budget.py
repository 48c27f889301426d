"""Rank-budget allocator: reaches the target, prefers insensitive layers, near-optimal, files round-trip."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from distill.budget import (
    _DP_UNITS,
    DENSE,
    allocate_ratios,
    load_budget,
    load_budget_meta,
    save_budget,
    summarize_allocation,
)
from distill.sensitivity import SensitivityTable, layer_rule_pattern


def make_table(losses: dict[str, list[float | None]], dense: dict[str, int], ratios, *, accuracy=True, base=0.9):
    """A table whose predicted loss of layer l at ratios[j] is losses[l][j]; params_after = dense / ratio."""
    layers = list(losses)
    values = [[None if v is None else (base - v if accuracy else base + v) for v in losses[n]] for n in layers]
    after = [
        [None if v is None else max(1, round(dense[n] / r)) for v, r in zip(losses[n], ratios, strict=True)]
        for n in layers
    ]
    return SensitivityTable(
        layers=layers,
        ratios=list(ratios),
        baseline=base,
        values=values,
        params_dense=dense,
        params_after=after,
        higher_is_better=accuracy,
    )


def brute_force(table: SensitivityTable, target: float, shrink: float = 0.0) -> float:
    """Least predicted loss over every combination whose params fit in (total / target - shrink)."""
    names = table.layers
    opts = [[(DENSE, table.params_dense[n], 0.0)] + table.options(n) for n in names]
    budget = sum(table.params_dense.values()) / target - shrink
    best = float("inf")
    for combo in itertools.product(*opts):
        if sum(o[1] for o in combo) <= budget:
            best = min(best, sum(o[2] for o in combo))
    return best


def predicted(table, alloc):
    return summarize_allocation(table, alloc)["predicted_loss"]


RATIOS = [2.0, 4.0, 8.0]


def test_reaches_target_and_prefers_insensitive_layers():
    dense = {"a": 1000, "b": 1000, "c": 1000}
    # "a" barely cares, "c" is fragile, "b" in between.
    table = make_table({"a": [0.001, 0.002, 0.004], "b": [0.01, 0.03, 0.08], "c": [0.2, 0.4, 0.6]}, dense, RATIOS)
    for target in (1.5, 2.0, 3.0, 4.0):
        alloc = allocate_ratios(table, target)
        s = summarize_allocation(table, alloc)
        assert s["achieved_ratio"] >= target, (target, alloc, s)
        assert alloc["a"] >= alloc["b"] >= alloc["c"], (target, alloc)
        assert predicted(table, alloc) == pytest.approx(brute_force(table, target), abs=1e-12)
    # With a mild target the fragile layer is not touched at all.
    assert allocate_ratios(table, 1.5)["c"] == DENSE


def test_uses_measured_params_not_nominal_ratio():
    # Tensorization rounding: layer "x" at nominal 4x really only reaches 3x; the budget must count that.
    table = SensitivityTable(
        layers=["x", "y"],
        ratios=[2.0, 4.0],
        baseline=1.0,
        values=[[0.99, 0.98], [0.99, 0.98]],
        params_dense={"x": 1200, "y": 1200},
        params_after=[[600, 400], [600, 300]],
    )
    alloc = allocate_ratios(table, 3.4)
    s = summarize_allocation(table, alloc)
    assert alloc == {"x": 4.0, "y": 4.0} and s["params_after"] == 700 and s["achieved_ratio"] >= 3.4
    # Nominal counts (300 + 300) would call 3.5x reachable; the measured 400 + 300 cannot reach it.
    with pytest.raises(ValueError, match=r"unreachable.*3\.429x"):
        allocate_ratios(table, 3.5)


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_within_dp_resolution(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    ratios = sorted(rng.sample([1.5, 2.0, 3.0, 4.0, 6.0, 8.0], k=rng.randint(1, 4)))
    dense = {f"l{i}": rng.randint(50, 5000) for i in range(n)}
    losses = {}
    for name in dense:
        # Noisy, non-monotone losses, some missing cells, like a real scan.
        losses[name] = [None if rng.random() < 0.15 else rng.uniform(-0.01, 0.3) for _ in ratios]
    table = make_table(losses, dense, ratios)
    total = sum(dense.values())
    max_ratio = total / sum(min([dense[k]] + [p for _, p, _ in table.options(k)]) for k in dense)
    target = rng.uniform(1.0, max_ratio)
    alloc = allocate_ratios(table, target)
    s = summarize_allocation(table, alloc)
    assert s["achieved_ratio"] >= target
    got = s["predicted_loss"]
    assert got >= brute_force(table, target) - 1e-12  # sanity: nothing beats the true optimum
    # The DP rounds each cost up by < 1 unit: it is as good as the optimum of a budget n units tighter.
    unit = total / target / _DP_UNITS
    assert got <= brute_force(table, target, shrink=n * unit) + 1e-12


def test_tight_target_exactly_at_maximum_compression():
    dense = {"a": 997, "b": 13}
    table = make_table({"a": [0.1, 0.2], "b": [0.3, 0.4]}, dense, [2.0, 4.0])
    most = sum(dense.values()) / sum(min(p for _, p, _ in table.options(k)) for k in dense)
    alloc = allocate_ratios(table, most)
    assert alloc == {"a": 4.0, "b": 4.0}


def test_error_metric_lower_is_better():
    dense = {"a": 100, "b": 100}
    table = make_table({"a": [0.5, 0.9], "b": [0.01, 0.02]}, dense, [2.0, 4.0], accuracy=False, base=0.0)
    alloc = allocate_ratios(table, 1.5)
    assert alloc["b"] > DENSE and alloc["a"] == DENSE


def test_param_counts_override_and_layer_subset():
    table = make_table({"a": [0.01, 0.02], "b": [0.3, 0.4]}, {"a": 100, "b": 100}, [2.0, 4.0])
    # "b" is actually ten times bigger than the table says: compressing only "a" no longer reaches 1.5x.
    alloc = allocate_ratios(table, 1.5, param_counts={"a": 100, "b": 1000})
    assert alloc["b"] > DENSE
    assert summarize_allocation(table, alloc, param_counts={"a": 100, "b": 1000})["achieved_ratio"] >= 1.5
    assert set(allocate_ratios(table, 2.0, layers=["a"])) == {"a"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_ratio=0.5), "target_ratio must be a finite number >= 1"),
        (dict(target_ratio=float("nan")), "target_ratio"),
        (dict(target_ratio=100.0), r"unreachable.*Scan higher ratios"),
        (dict(target_ratio=2.0, param_counts={"a": 100}), "param_counts lacks layers"),
        (dict(target_ratio=2.0, param_counts={"a": 100, "b": 0}), "positive integers"),
        (dict(target_ratio=2.0, layers=["zz"]), "not in the sensitivity table"),
    ],
)
def test_errors(kwargs, match):
    table = make_table({"a": [0.01, 0.02], "b": [0.3, 0.4]}, {"a": 100, "b": 100}, [2.0, 4.0])
    with pytest.raises(ValueError, match=match):
        allocate_ratios(table, **kwargs)


def test_wrong_table_type():
    with pytest.raises(TypeError, match="SensitivityTable"):
        allocate_ratios({"a": 1}, 2.0)


def test_save_load_budget_round_trip(tmp_path):
    table = make_table(
        {"layer1.0.conv1": [0.001, 0.002], "fc": [0.3, 0.4]}, {"layer1.0.conv1": 900, "fc": 100}, [2.0, 4.0]
    )
    alloc = allocate_ratios(table, 2.0)
    path = tmp_path / "sub" / "budget.json"
    save_budget(path, alloc, {"target": 2.0, **summarize_allocation(table, alloc)})
    rules = load_budget(path)
    assert rules == {n: (None if r == DENSE else {"ratio": r}) for n, r in alloc.items()}
    assert load_budget_meta(path)["target"] == 2.0
    assert [p.name for p in path.parent.iterdir()] == ["budget.json"]  # no temporary left behind


def test_load_budget_escapes_patterns_and_rejects_bad_files(tmp_path):
    import fnmatch

    save_budget(tmp_path / "b.json", {"blocks[0].proj": 2.0})
    (pattern,) = load_budget(tmp_path / "b.json")
    assert fnmatch.fnmatchcase("blocks[0].proj", pattern) and not fnmatch.fnmatchcase("blocks0.proj", pattern)
    assert layer_rule_pattern("a.b") == "a.b"

    with pytest.raises(ValueError, match="does not exist"):
        load_budget(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_budget(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a budget file"):
        load_budget(tmp_path / "other.json")
    with pytest.raises(ValueError, match="must be finite and >= 1"):
        save_budget(tmp_path / "c.json", {"a": 0.5})
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_budget(tmp_path / "c.json", {"a": 2.0}, {"x": object()})
    assert not (tmp_path / "c.json").exists()
