"""Submitting a sweep to a Ray cluster as a Ray job (`emsweep submit / logs / stop`).

The job runs `emsweep run SPEC --address auto --out OUT` on the cluster, which must have
emsweep installed (see cluster/). The spec file reaches the cluster through the job's
`working_dir` (the spec's directory by default, uploaded by Ray); its relative paths then
resolve inside that uploaded copy, so paths to data and models should be absolute on the
cluster, hub ids, URLs, or `${VAR}`s set with `--env`.

Submission ids are stable: `emsweep-<name>-<hash of the spec file>`, and `-a<n>` for the
n-th attempt. Submitting the same spec again finds the earlier attempts: if one is still
pending or running it is reported, not duplicated; otherwise a new attempt writes into the
same output dir, where the pipeline skips every node already done (the run resumes).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

ACTIVE = ("PENDING", "RUNNING")
DEFAULT_OUT = "${EMSWEEP_RUNS:-$HOME/emsweep-runs}"


def base_submission_id(spec_path: Path, name: str) -> str:
    digest = hashlib.sha256(Path(spec_path).read_bytes()).hexdigest()[:10]
    return f"emsweep-{name}-{digest}"


def attempt_id(base: str, attempt: int) -> str:
    return base if attempt == 1 else f"{base}-a{attempt}"


def attempt_number(submission_id: str, base: str) -> int | None:
    """1 for `base`, n for `base-a<n>`, None for an unrelated id."""
    if submission_id == base:
        return 1
    suffix = submission_id.removeprefix(base + "-a")
    return int(suffix) if suffix != submission_id and suffix.isdigit() else None


def entrypoint(spec_file: str, out_dir: str) -> str:
    # A shell command on the cluster: `$HOME` / `${EMSWEEP_RUNS}` in out_dir expand there.
    return f"python -m emsweep.cli run {shlex.quote(spec_file)} --address auto --out {out_dir}"


@dataclass
class Submission:
    submission_id: str
    attempt: int
    status: str  # the job's status after this call
    submitted: bool  # False: an earlier attempt is still pending or running
    out_dir: str


def attempts(client, base: str) -> list[tuple[int, object]]:
    """(attempt number, JobDetails) of every job of this spec on the cluster, oldest first."""
    found = []
    for job in client.list_jobs():
        number = attempt_number(job.submission_id or "", base)
        if number is not None:
            found.append((number, job))
    return sorted(found, key=lambda item: item[0])


def submit(
    client,
    spec_path: Path,
    name: str,
    *,
    out_dir: str | None = None,
    working_dir: Path | None = None,
    env: dict[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> Submission:
    spec_path = Path(spec_path).resolve()
    working_dir = (working_dir or spec_path.parent).resolve()
    try:
        spec_file = spec_path.relative_to(working_dir).as_posix()
    except ValueError:
        raise ValueError(f"{spec_path} is not inside the working dir {working_dir}") from None
    base = base_submission_id(spec_path, name)
    out = out_dir or f"{DEFAULT_OUT}/{name}"
    earlier = attempts(client, base)
    if earlier:
        number, job = earlier[-1]
        status = str(job.status.value if hasattr(job.status, "value") else job.status)
        if status in ACTIVE:
            return Submission(job.submission_id, number, status, False, (job.metadata or {}).get("out_dir", out))
        # Resume: the same output dir as the previous attempt, so done nodes are reused.
        out = (job.metadata or {}).get("out_dir", out) if out_dir is None else out_dir
    attempt = earlier[-1][0] + 1 if earlier else 1
    submission_id = attempt_id(base, attempt)
    client.submit_job(
        entrypoint=entrypoint(spec_file, out),
        submission_id=submission_id,
        runtime_env={"working_dir": str(working_dir), "env_vars": dict(env or {})},
        metadata={"emsweep_spec": name, "out_dir": out, "attempt": str(attempt)},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )
    return Submission(submission_id, attempt, "PENDING", True, out)


def latest_id(client, spec_or_id: str) -> str:
    """A submission id as given, or the latest attempt of a spec file's jobs."""
    path = Path(spec_or_id)
    if not path.is_file():
        return spec_or_id
    from emsweep.spec import load_spec

    base = base_submission_id(path, load_spec(path).name)
    earlier = attempts(client, base)
    if not earlier:
        raise LookupError(f"no job of {path} (submission id {base}) on this cluster")
    return earlier[-1][1].submission_id
