"""Live progress of running jobs: a small JSON record per job in `DIR/progress/`, written
atomically by the job itself (a finetune's rank-0 worker after every step, a sample job as vLLM
finishes requests, a judge job after every batch) and read by `emsweep run`'s terminal display
and by `emsweep status DIR`. A record is removed when its job finishes (and every record when a
run starts: the lock says no other run is live); one not updated for QUIET_S says since when.
For an object-store sweep DIR is the store's URI (jobs run on any machine, the display on the
driver's), and records are written at most every REMOTE_MIN_INTERVAL_S.

Record: {"job": first node id, "nodes": [node ids], "stage", "phase" (e.g. "answers",
"pushback turn 2"), "done", "total", "unit" ("steps", "requests", "judgments"), "detail"
(e.g. "loss 1.234"), "started_at", "phase_started_at", "updated_at"} (times: seconds since
the epoch; the ETA is from the phase's own rate).
"""

from __future__ import annotations

import json
import os
import re
import time

from emsweep import fileio

# Past this without an update a record says how long ago its last update was.
QUIET_S = 120.0
# A record is rewritten at most this often (vLLM finishes many requests a second); on an object
# store, where each write is a billed request, less often.
MIN_INTERVAL_S = 1.0
REMOTE_MIN_INTERVAL_S = 5.0


def record_relative(job_id: str) -> str:
    """A job's record, relative to the output dir (or the store's URI)."""
    return f"progress/{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"


def record_location(out_dir: str | os.PathLike, job_id: str) -> str:
    return fileio.join(str(out_dir), record_relative(job_id))


class ProgressWriter:
    """What a running job says about itself; `update` is cheap to call often (throttled)."""

    def __init__(self, location: str | os.PathLike | None, stage: str, nodes: list[str], sink=None):
        """`location`: the record's (record_location), a path or a store URI; None writes nothing.
        `sink(record, metrics)` hears of every write too (tracking.LiveCounters: W&B)."""
        self.location = str(location) if location else None
        self.min_interval_s = REMOTE_MIN_INTERVAL_S if self.location and fileio.is_remote(self.location) \
            else MIN_INTERVAL_S
        self.sink = sink
        self.record = {"job": nodes[0] if nodes else "", "nodes": list(nodes), "stage": stage, "phase": "",
                       "done": 0, "total": None, "unit": "", "detail": "", "started_at": time.time()}
        self._written = 0.0

    def update(self, done: int, total: int | None, unit: str, detail: str = "", phase: str | None = None,
               force: bool = False, metrics: dict | None = None) -> None:
        """`metrics`: numbers behind `detail` (e.g. output_tokens_per_s), for the sink."""
        if self.location is None:
            return
        now = time.time()
        if phase is not None and phase != self.record["phase"]:
            self.record.update(phase=phase, phase_started_at=now)  # rates and ETAs are per phase
        self.record.update(done=int(done), total=None if total is None else int(total), unit=unit, detail=detail)
        if not force and now - self._written < self.min_interval_s and (total is None or done < total):
            return
        self._written = now
        try:
            fileio.write_text_at(self.location, json.dumps({**self.record, "updated_at": now}))
        except OSError:  # progress is for people; it never fails the job (pyarrow's errors are OSErrors)
            pass
        if self.sink is not None:
            self.sink(self.record, metrics or {})


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """Every job's latest record, oldest job first (`out_dir`: a path or a store URI)."""
    records = []
    fs, paths = fileio.files_at(fileio.join(str(out_dir), "progress"), suffix=".json")
    for path in paths:
        try:
            with fs.open_input_stream(path) as stream:
                records.append(json.loads(stream.read()))
        except (OSError, ValueError):
            continue  # being replaced, or removed as its job finished
    return sorted(records, key=lambda r: r.get("started_at", 0))


def clear(out_dir: str | os.PathLike, node_ids: list[str]) -> None:
    """Remove the records of finished jobs (their nodes' ids)."""
    for record in read_records(out_dir):
        if set(record.get("nodes", ())) & set(node_ids):
            fileio.delete_at(record_location(out_dir, record["job"]))


def describe(record: dict, now: float | None = None, amount: bool = True) -> str:
    """One line: `finetune/m__d__s0 training: 12/40 steps (30%), loss 1.234, ETA 9s` (without
    the counts when a progress bar shows them: `amount=False`)."""
    now = time.time() if now is None else now
    done, total, unit = record.get("done", 0), record.get("total"), record.get("unit", "")
    since = record.get("phase_started_at", record.get("started_at", now))
    elapsed = max(1e-9, record.get("updated_at", now) - since)
    phase = f" {record['phase']}" if record.get("phase") else ""
    counts = (f"{done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{done} {unit}") if unit else ""
    parts = [f"{record.get('job', '?')}{phase}" + (f": {counts}" if amount and counts else "")]
    if record.get("detail"):
        parts.append(record["detail"])
    # vLLM finishes a batch's requests together at its end: a rate of requests would not say when.
    if done and total and done < total and unit != "requests":
        parts.append(f"ETA {_duration((total - done) / (done / elapsed))}")
    age = now - record.get("updated_at", now)
    if age > QUIET_S:  # a long batch, or a job that died without its driver knowing yet
        parts.append(f"last update {_duration(age)} ago")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def vllm_progress(writer: ProgressWriter, phase: str):
    """A factory for vLLM's `use_tqdm`: a tqdm that draws nothing and reports finished requests
    (and vLLM's own tokens/s estimate) to `writer`.

    vLLM makes two bars with it: one over the prompts as they are rendered (an iterable: not
    reported), then one whose total is the engine's unfinished requests, where a prompt asking
    for n samples counts n and adds n when it finishes; so its count `n` is what reaches the total."""
    import io

    from tqdm import tqdm

    class _Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()  # vLLM's bar is not drawn; emsweep's display shows the record
            super().__init__(*args, **kwargs)
            self.reporting = self.iterable is None
            if self.reporting:
                writer.update(0, self.total, "requests", phase=phase, force=True)

        def update(self, n=1):
            super().update(n)
            if not self.reporting:
                return
            # vLLM's postfix: "est. speed input: X toks/s, output: Y toks/s".
            speed = str(self.postfix).split("output: ")[-1] if "output: " in str(self.postfix) else ""
            number = re.match(r"[0-9.]+", speed)
            writer.update(int(self.n), self.total, "requests", detail=f"output {speed}" if speed else "",
                          phase=phase, metrics={"output_tokens_per_s": float(number[0])} if number else None)

    return _Reporting
