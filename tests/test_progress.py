"""Progress records of running jobs (emsweep/progress.py): written atomically, throttled, read
back and described with the right numbers; the vLLM adapter counts finished requests the way
vLLM's own loop reports them. Real jobs write them in tests/test_e2e.py (the run's log lines and
`emsweep status` on a running sweep)."""

import json
from pathlib import Path

from emsweep import progress


def test_a_record_is_written_read_described_and_cleared(tmp_path):
    path = Path(progress.record_location(tmp_path, "finetune/m__d__s0"))
    assert path == tmp_path / "progress" / "finetune_m__d__s0.json"
    writer = progress.ProgressWriter(path, "finetune", ["finetune/m__d__s0"])
    writer.update(0, 40, "steps", phase="training", force=True)
    writer.update(1, 40, "steps", detail="loss 2.000")  # within MIN_INTERVAL_S: not written
    assert json.loads(path.read_text())["done"] == 0
    writer.update(10, 40, "steps", detail="loss 1.234", force=True)
    (record,) = progress.read_records(tmp_path)
    assert (record["done"], record["total"], record["detail"]) == (10, 40, "loss 1.234")
    record.update(phase_started_at=1000.0, updated_at=1020.0)  # 10 steps in 20 s: 30 more take 60 s
    assert progress.describe(record, now=1021.0) == (
        "finetune/m__d__s0 training: 10/40 steps (25%), loss 1.234, ETA 1m00s")
    assert progress.describe(record, now=1021.0, amount=False) == "finetune/m__d__s0 training, loss 1.234, ETA 1m00s"
    assert progress.describe(record, now=1020.0 + progress.QUIET_S + 5).endswith("last update 2m05s ago")
    progress.clear(tmp_path, ["sample/other"])
    assert len(progress.read_records(tmp_path)) == 1
    progress.clear(tmp_path, ["finetune/m__d__s0"])
    assert progress.read_records(tmp_path) == []


def test_the_last_update_is_always_written(tmp_path):
    writer = progress.ProgressWriter(progress.record_location(tmp_path, "judge/x"), "judge", ["judge/x"])
    for done in range(1, 6):  # five batches within a second: the first and the finished one land
        writer.update(done, 5, "judgments")
    assert progress.read_records(tmp_path)[0]["done"] == 5


def test_the_vllm_adapter_counts_finished_requests(tmp_path):
    heard = []
    writer = progress.ProgressWriter(progress.record_location(tmp_path, "sample/m__base"), "sample", ["sample/m__base"],
                                     sink=lambda record, metrics: heard.append((record["done"], record["total"], metrics)))
    factory = progress.vllm_progress(writer, "answers")
    # As vLLM drives its bars: first one over the 3 prompts as they are rendered (not reported),
    # then one whose total is the engine's 12 requests (3 prompts of n=4), with update(4) as each
    # prompt's samples finish (what the e2e sweep showed: totals of 30 prompts and 90 requests).
    assert list(factory([1, 2, 3], desc="Rendering prompts")) == [1, 2, 3] and heard == []
    bar = factory(total=12, desc="Processed prompts", dynamic_ncols=True,
                  postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
    for _ in range(3):
        bar.postfix = "est. speed input: 120.00 toks/s, output: 35.50 toks/s"
        bar.update(4)
    bar.close()
    (record,) = progress.read_records(tmp_path)
    assert (record["done"], record["total"], record["unit"], record["phase"]) == (12, 12, "requests", "answers")
    assert record["detail"] == "output 35.50 toks/s"
    assert heard[0] == (0, 12, {}) and heard[-1] == (12, 12, {"output_tokens_per_s": 35.5})


def test_batched_requests_get_no_eta():
    record = {"job": "sample/m__base", "phase": "answers", "done": 2, "total": 192, "unit": "requests",
              "detail": "output 6.67 toks/s", "started_at": 0.0, "phase_started_at": 50.0, "updated_at": 60.0}
    assert progress.describe(record, now=61.0) == "sample/m__base answers: 2/192 requests (1%), output 6.67 toks/s"


def test_log_lines_are_not_repeated_unchanged():
    from emsweep.cli.live import UNCHANGED_LINE_EVERY_S, changed_lines

    def describe(record):
        return f"{record['job']} {record['done']}/{record['total']}"

    printed: dict = {}
    first = [{"job": "finetune/a", "done": 0, "total": 6}, {"job": "sample/b", "done": 0, "total": 192}]
    assert changed_lines(first, printed, 0.0, describe) == ["finetune/a 0/6", "sample/b 0/192"]
    # 30 s later nothing moved: no line (the log once held "training: 0/6 steps (0%)" twice).
    assert changed_lines(first, printed, 30.0, describe) == []
    moved = [{"job": "finetune/a", "done": 1, "total": 6}, {"job": "sample/b", "done": 0, "total": 192}]
    assert changed_lines(moved, printed, 60.0, describe) == ["finetune/a 1/6"]
    # A job stuck for long is shown again, so a hang is visible in the log.
    assert changed_lines(moved, printed, UNCHANGED_LINE_EVERY_S, describe) == ["sample/b 0/192"]
