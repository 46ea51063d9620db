"""The benchmark harness in smoke mode: every measure yields finite numbers (no timing asserts)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_writes_every_measure(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    # P8 (two whole sweeps) runs in tests/test_pipelined.py, which checks its outputs too. P2s is
    # P2 with fewer samples per question, and smoke mode gives every measure 2: the same run as P2.
    measures = ["P1", "P2", "P3", "P4", "P4e", "P4d", "P5", "P6", "P6l"]
    subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--only", *measures], cwd=REPO,
                   env=env, check=True)
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(measures)
    for name, result in results.items():
        assert math.isfinite(result["ours"]) and result["ours"] > 0, name
        if name != "P5":
            assert math.isfinite(result["ratio"]) and result["ratio"] > 0, name
    assert results["P5"]["runs"][0]["nodes"] >= 100
    for name in ("P1", "P2", "P6", "P6l"):  # each side's own token count over its own time
        assert results[name]["ours_tokens_per_s"] > 0 and results[name]["baseline_tokens_per_s"] > 0, name
    # Both exact methods compute the same P(n): their 0-100 scores agree to arithmetic noise.
    assert results["P4e"]["runs"][0]["max_score_difference"] < 2.0


def test_show_reprints_a_saved_results_file(tmp_path):
    """`--show` renders a results file without measuring; absolute-rate columns appear only when measured."""
    measured = {"ours": 50.0, "baseline": 49.0, "ratio": 0.98, "target": 0.9, "verdict": "pass",
                "measure": "finetune tokens/s / plain peft loop", "ours_tokens_per_s": 92.5}
    payload = {"smoke": False, "repeats": 3, "machine": {"cores": 2}, "results": {"P6": measured}}
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(payload))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    shown = subprocess.run([sys.executable, "-m", "bench.run", "--show", str(saved)], cwd=REPO, env=env, check=True,
                           capture_output=True, text=True).stdout
    assert "P6" in shown and "92.5" in shown and "ours tok/s" in shown
    assert "MFU" not in shown
