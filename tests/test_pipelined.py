"""The pipelined schedule against the barrier one, on a real CPU sweep through `emsweep run` (the
P8 benchmark's, smoke size: two finetunes of unequal length, sampled and judged by vLLM): the
same nodes and keys, the same answers and scores, and a run judged before the last finetune ends.
"""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow

ANSWER_KEYS = ["run_id", "suite", "condition", "question_id", "turn", "paraphrase_idx", "sample_idx"]


@pytest.fixture(scope="module")
def p8(tmp_path_factory):
    from bench.run import p8

    root = tmp_path_factory.mktemp("p8")
    return root, p8(smoke=True, root=root)


def _done(out: Path) -> dict[str, dict]:
    return {marker.parent.relative_to(out).as_posix(): json.loads(marker.read_text())
            for marker in out.glob("nodes/*/*/_DONE.json")}


def _table(out: Path, node: str, name: str, keys: list[str]):
    return pq.read_table(out / node / name).to_pandas().sort_values(keys).reset_index(drop=True)


def test_same_nodes_keys_answers_and_scores(p8):
    root, _ = p8
    barrier, pipelined = _done(root / "barrier"), _done(root / "pipelined")
    assert set(barrier) == set(pipelined) and len(barrier) == 9, (sorted(barrier), sorted(pipelined))
    for node in barrier:
        if node.startswith("nodes/sample/"):
            a = _table(root / "barrier", node, "samples.parquet", ANSWER_KEYS)
            b = _table(root / "pipelined", node, "samples.parquet", ANSWER_KEYS)
            assert len(a) == 4 and a["answer"].str.len().min() > 0
            # Per-request seeds: the same answers from a long-lived engine that served another run first.
            assert a["answer"].tolist() == b["answer"].tolist(), node
        if node.startswith("nodes/judge/"):
            a = _table(root / "barrier", node, "judgments.parquet", ANSWER_KEYS + ["metric"])
            b = _table(root / "pipelined", node, "judgments.parquet", ANSWER_KEYS + ["metric"])
            assert len(a) == 8 and a["score"].between(0, 100).all()
            assert (a["score"] - b["score"]).abs().max() < 0.5, node


def test_pipelined_samples_a_run_before_the_last_finetune_ends(p8):
    """Barrier: every sample starts after the last finetune. Pipelined: the first finished run is
    sampled (on an engine that later serves the other run) while the other still trains. On 2
    cores its judging competes with that finetune for the same cores, so only sampling's order
    is fixed here; bench P8 reports the times."""
    root, result = p8
    for schedule in ("barrier", "pipelined"):
        records = list(_done(root / schedule).values())
        last_finetune = max(r["finished_at"] for r in records if r["stage"] == "finetune")
        first_sampled = min(r["finished_at"] for r in records if r["stage"] == "sample")
        if schedule == "barrier":
            assert first_sampled > last_finetune
        else:
            assert first_sampled < last_finetune, "the pipelined schedule waited for every finetune"
    assert result["ours"] > 0 and result["baseline"] > 0 and result["ratio"] > 0 and result["first_judged_ratio"] > 0
