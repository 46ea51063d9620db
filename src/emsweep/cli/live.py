"""The live display of a running sweep: under the node bar one bar per running job, or, without a terminal, a progress line per job when it changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.markup import escape
from rich.progress import Progress

from emsweep.cli.common import console


# Without a terminal (a log file, CI) running jobs' progress is one line each this often.
LOG_PROGRESS_EVERY_S = float(os.environ.get("EMSWEEP_PROGRESS_EVERY_S", "30"))


# A job whose line has not changed is logged again after this long, so a stuck job stays visible.
UNCHANGED_LINE_EVERY_S = 300.0


def changed_lines(records: list[dict], printed: dict[str, tuple[str, float]], now: float, describe) -> list[str]:
    """The progress lines to log now: each job's line when it differs from the last one logged for
    that job (or that one is UNCHANGED_LINE_EVERY_S old); `printed` is updated."""
    lines = []
    for record in records:
        line = describe(record)
        last = printed.get(record["job"])
        if last is None or last[0] != line or now - last[1] >= UNCHANGED_LINE_EVERY_S:
            printed[record["job"]] = (line, now)
            lines.append(line)
    return lines


class LiveJobs:
    """Under the node bar, one bar per running job from its progress record (progress.py): a
    finetune's steps and loss, a sample job's requests and tokens/s, a judge job's judgments.
    Without a terminal, a line per running job every LOG_PROGRESS_EVERY_S instead of bars.
    `out_dir`: a path, or an object store's URI (where jobs on every machine write their records)."""

    def __init__(self, out_dir: str | Path, bars: Progress):
        import threading

        from emsweep.progress import MIN_INTERVAL_S, REMOTE_MIN_INTERVAL_S
        from emsweep.fileio import is_remote

        self.out_dir, self.bars = out_dir, bars
        # As often as the records are rewritten there.
        self.poll_s = REMOTE_MIN_INTERVAL_S if is_remote(out_dir) else MIN_INTERVAL_S
        self.tasks: dict[str, int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="emsweep-progress", daemon=True)
        self.last_logged = time.time()
        self.printed: dict[str, tuple[str, float]] = {}  # job -> (its last line, when)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        for task in self.tasks.values():
            self.bars.remove_task(task)

    def _run(self) -> None:
        from emsweep import progress

        while not self.stopped.wait(self.poll_s):
            try:
                records = progress.read_records(self.out_dir)
                if console.is_terminal:
                    self._draw(records, progress)
                elif records and time.time() - self.last_logged >= LOG_PROGRESS_EVERY_S:
                    self.last_logged = time.time()
                    for line in changed_lines(records, self.printed, self.last_logged, progress.describe):
                        console.print(f"  progress {escape(line)}", highlight=False)
            except Exception:  # the display never stops a sweep
                continue

    def _draw(self, records: list[dict], progress) -> None:
        live = {record["job"]: record for record in records}
        for job in set(self.tasks) - set(live):
            self.bars.remove_task(self.tasks.pop(job))
        for job, record in live.items():
            description = "  " + escape(progress.describe(record, amount=False))
            if job not in self.tasks:
                self.tasks[job] = self.bars.add_task(description, total=record.get("total"))
            self.bars.update(self.tasks[job], description=description, completed=record.get("done", 0),
                             total=record.get("total"))
