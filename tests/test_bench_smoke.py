"""The benchmark grid runs end to end on its smallest preset and writes a complete table and JSON.

Only the plumbing is checked here (every provider timed or skipped with a reason, every column present); speed
itself is never asserted in unit tests.
"""

from __future__ import annotations

import json

import pytest


def test_grid_smoke_writes_json_and_table(tmp_path):
    run_grid = pytest.importorskip("bench.run_grid")
    run_grid.main(["--preset", "smoke", "--passes", "fwd", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "grid-smoke.json").read_text())
    assert data["records"], "no grid point ran"
    kinds = {r["kind"] for r in data["records"]}
    assert kinds == {"linear", "conv"}
    for r in data["records"]:
        assert {"dense", "tnkernels"} <= set(r["times_s"]), r
        for name, why in r["skipped"].items():
            assert why, f"{name} skipped without a reason"
        for name, t in r["times_s"].items():
            assert t > 0, (name, t)
        assert r["roofline_speedup"] > 0 and r["plan"]
    lin = next(r for r in data["records"] if r["kind"] == "linear")
    assert "naive-einsum" in lin["times_s"]
    env = data["environment"]
    assert env["versions"]["torch"] and env["threads"] >= 1 and "calibration" in env
    assert data["recompute_saved_bytes"]["recompute"] < data["recompute_saved_bytes"]["save"]
    assert data["plan_lookup_us"] > 0
    md = (tmp_path / "grid-smoke.md").read_text()
    assert "| layer |" in md and "minilm-mlp-down" in md
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, "temporary file left behind"
