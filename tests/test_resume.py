"""A failed node does not stop the others, and a rerun (`emsweep resume DIR`) redoes only its chain."""

from __future__ import annotations

import json
from pathlib import Path

import ray

from emsweep.sweep.driver import run_sweep, worker_env
from emsweep.sweep.results import read_spec_snapshot
from emsweep.spec import SweepSpec

SUITE = Path(__file__).resolve().parents[1] / "src/emsweep/suites/factual_recall.yaml"


def _rows(n: int) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(n))


def test_a_failed_dataset_is_redone_alone_on_resume(tmp_path):
    (tmp_path / "good.jsonl").write_text(_rows(3))
    (tmp_path / "bad.jsonl").write_text(_rows(2) + "{not json\n")
    spec = SweepSpec.model_validate({
        "name": "resume",
        "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "good", "path": str(tmp_path / "good.jsonl")},
                     {"name": "bad", "path": str(tmp_path / "bad.jsonl")}],
        "seeds": [0, 1],
        "eval": {"suites": [{"name": "facts", "questions": str(SUITE)}]},
        "judge": {"model": "smol"},
    })
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()})
    try:
        first = {r.node.name: r for r in run_sweep(spec, out, until="data")}
        assert first["good"].status == "done"
        assert first["bad"].status == "failed" and "bad.jsonl" in first["bad"].error

        (tmp_path / "bad.jsonl").write_text(_rows(2))  # the data is fixed; resume from the snapshot
        resumed = {r.node.name: r.status for r in run_sweep(read_spec_snapshot(out), out, until="data")}
        assert resumed == {"good": "cached", "bad": "done"}
    finally:
        ray.shutdown()
