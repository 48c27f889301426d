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
    # below 64 rows the framework floor is timed in the same rounds and summarized beside the pure roofline
    assert lin["rows"] < 64 and lin["times_s"]["floor"] > 0
    summary = data["summary"]
    assert summary["max_measured_over_roofline_plus_floor_rows_lt_64"] > 0
    assert summary["rows_lt_64_within_1.3x_roofline_plus_floor"].endswith("/1")
    env = data["environment"]
    assert env["versions"]["torch"] and env["threads"] >= 1 and "calibration" in env
    assert data["recompute_saved_bytes"]["recompute"] < data["recompute_saved_bytes"]["save"]
    assert data["plan_lookup_us"] > 0
    md = (tmp_path / "grid-smoke.md").read_text()
    assert "| layer |" in md and "minilm-mlp-down" in md
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, "temporary file left behind"


def test_grid_resumes_an_interrupted_run_without_timing_finished_cells(tmp_path, monkeypatch):
    run_grid = pytest.importorskip("bench.run_grid")
    args = ["--preset", "smoke", "--passes", "fwd", "--out", str(tmp_path)]
    first = run_grid.main(args)
    # what an interrupted run leaves: the finished cells in the partial file
    partial = tmp_path / "grid-smoke.partial.json"
    saved = dict(preset="smoke", settings=first["settings"], records=first["records"])
    partial.write_text(json.dumps(saved))

    def must_not_run(*a, **k):
        raise AssertionError("a finished cell was timed again")

    monkeypatch.setattr(run_grid, "bench_linear", must_not_run)
    monkeypatch.setattr(run_grid, "bench_conv", must_not_run)
    second = run_grid.main(args)
    assert second["records"] == json.loads(json.dumps(first["records"], default=str))  # as saved, not re-timed
    assert not partial.exists()  # a finished run removes it
    partial.write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="timed again"):
        run_grid.main([*args, "--fresh"])  # --fresh starts over


def test_plan_check_smoke_judges_the_pick(tmp_path):
    plan_check = pytest.importorskip("bench.plan_check")
    from bench.providers import SKIP_FACTOR
    from tnkernels.plan import PLAN_KINDS

    out = plan_check.main(["--smoke", "--rounds", "1", "--reps", "1", "--out", str(tmp_path)])
    recs = out["records"]  # from_linear's pick (low rank) and the best balanced structure
    assert [r["structure"]["label"] for r in recs] == ["low-rank", "2 cores"]
    for rec in recs:
        assert rec["chosen"] in PLAN_KINDS and rec["fastest"] in rec["measured_s"]
        # every kind is either timed or listed as not run (predicted far slower than the best)
        assert set(rec["measured_s"]) | set(rec["skipped_predicted_s"]) == set(rec["predicted_s"])
        assert len(rec["measured_s"]) >= 3
        best = min(rec["predicted_s"].values())
        assert all(v > SKIP_FACTOR * best for v in rec["skipped_predicted_s"].values())
        assert rec["chosen_over_fastest"] >= 1.0
    assert 0.0 <= out["within_10pct_fraction"] <= 1.0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md"], files  # no temporary file left


def test_structure_tradeoff_lists_every_structure_with_error_and_time():
    tradeoff = pytest.importorskip("bench.structure_tradeoff")
    import torch

    w = torch.randn(96, 64)
    rows = tradeoff.tradeoff("tiny", 4, w, "random")
    assert len(rows) >= 3 and {r["cores"] for r in rows} >= {2, 3}
    assert [r["structure"] for r in rows].count("low-rank") == 1
    for r in rows:
        assert 0.0 < r["rel_error"] < 1.0 and all(t > 0 for t in r["predicted_fwd_s"].values())
    picked = {p for r in rows for p in r["picked_by"]}
    assert picked == {"speed", "accuracy"}


def test_generate_bench_smoke(tmp_path):
    pytest.importorskip("transformers")
    hf_generate = pytest.importorskip("bench.hf_generate")
    out = tmp_path / "gen.md"
    for size, head in (("tiny", []), ("tiny", ["--head"]), ("tiny-llama", [])):
        flags = ["--size", size, "--ratios", "2", "4", "--new-tokens", "3", "--rounds", "1", *head]
        hf_generate.main([*flags, "--out", str(out)])
        text = out.read_text()
        rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert [r.split("|")[1].strip() for r in rows] == ["2", "4"]
        for r in rows:
            cells = [c.strip() for c in r.strip("|").split("|")]
            # the decode columns are a difference of timings: at this size either a positive ratio or the noise
            # marker, never a negative "speed-up" (a timing, so no bound on its value here)
            assert len(cells) == 10, r
            assert cells[4].startswith("noise") or (cells[6].endswith("x") and float(cells[6][:-1]) > 0), r
        assert ("blocks and lm_head" in text) == bool(head)


def test_load_memory_bench_smoke(tmp_path):
    """bench/load_memory.py on a tiny GPT-2: both loads run in their own processes and agree."""
    load_memory = pytest.importorskip("bench.load_memory")
    pytest.importorskip("transformers")
    stem = tmp_path / "load"
    load_memory.main(["--layers", "2", "--hidden", "50", "--vocab", "300", "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["skeleton"] for r in rows] == ["meta", "dense"]
    assert all(r["peak_rss_gib"] > 0 for r in rows) and rows[0]["hidden_sum"] == rows[1]["hidden_sum"]
    assert "| meta |" in stem.with_suffix(".md").read_text()


def test_tucker_rank_ab_smoke():
    tucker_rank_ab = pytest.importorskip("bench.tucker_rank_ab")
    rows = tucker_rank_ab.main(["--channels", "8", "--size", "6", "--pairs", "4x4", "3x5", "--rounds", "1"])
    assert [r["provider"] for r in rows] == ["dense", "4x4 (ratio 2.77)", "3x5 (ratio 2.89)"]
    assert all(r["us"] > 0 and r["vs_dense"] > 0 for r in rows)
