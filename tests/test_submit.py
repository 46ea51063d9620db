"""`emsweep submit / logs / stop` against a real Ray head on loopback (`ray start --head`)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emsweep.cli import app
from emsweep.submit import attempt_id, attempt_number, base_submission_id

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_submission_ids(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\n")
    base = base_submission_id(spec, "x")
    assert re.fullmatch(r"emsweep-x-[0-9a-f]{10}", base)
    assert base == base_submission_id(spec, "x")  # stable
    assert attempt_id(base, 1) == base and attempt_id(base, 3) == f"{base}-a3"
    assert attempt_number(base, base) == 1 and attempt_number(f"{base}-a3", base) == 3
    assert attempt_number(f"{base}x", base) is None and attempt_number("other", base) is None
    spec.write_text("name: x\nseeds: [1]\n")
    assert base_submission_id(spec, "x") != base  # another spec, another job


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head on loopback: own temp dir, ports and CPUs; stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="emsweep-ray-", dir="/tmp"))
    gcs, dashboard, client, manager, objects, agent_grpc, agent_http, metrics, runtime_env, low = free_ports(10)
    # 201 worker ports in 20000-39999, clear of the ports above: Ray refuses to start when one of
    # its pre-selected ports falls inside the worker range (seen in CI: gcs 38749 in 38717-38917).
    components = (gcs, dashboard, client, manager, objects, agent_grpc, agent_http, metrics, runtime_env)
    workers = 20000 + low % 20000
    while any(workers <= port <= workers + 200 for port in components) or workers + 200 > 39999:
        workers = 20000 + (workers - 20000 + 211) % 19799
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           # A token in ~/.ray would switch on token auth; this head is private and on loopback.
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS")
    command = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), "--node-manager-port", str(manager),
        "--object-manager-port", str(objects), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--dashboard-agent-listen-port", str(agent_http), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env), "--min-worker-port", str(workers),
        "--max-worker-port", str(workers + 200),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp), "--disable-usage-stats",
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        # Only this head: `ray stop` would stop every Ray on the machine, so kill the processes
        # that name this head's temp dir or GCS port (the client server names the GCS by the
        # machine's address, not loopback), and their descendants.
        _stop_head(temp, f":{gcs} ")
        shutil.rmtree(temp, ignore_errors=True)


def _head_processes(markers: list[str]) -> set[int]:
    """Pids whose command line names this head (its temp dir or GCS port), and their descendants:
    Ray renames its agents with setproctitle (`ray::DashboardAgent`), which drops the arguments."""
    parents, found = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + " "
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if state == "Z":  # exited, waiting to be reaped: nothing left to stop
            continue
        parents[int(proc.name)] = int(parent)
        if any(marker in cmdline for marker in markers):
            found.add(int(proc.name))
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found - {os.getpid()}


def _stop_head(temp: Path, gcs_port_marker: str) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _head_processes([str(temp), gcs_port_marker]):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)
    left = _head_processes([str(temp), gcs_port_marker])
    assert not left, f"processes of the test's Ray head survived: {sorted(left)}"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_submit_logs_stop_resubmit(ray_head, shared_em, tmp_path):
    from ray.job_submission import JobSubmissionClient

    address = ray_head["address"]
    spec = REPO / "workflows" / "quickstart.yaml"
    out = tmp_path / "runs" / "quickstart"
    # HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are variables emsweep sets for its workers too:
    # the job's driver must leave them to the job (Ray refuses to merge a repeated key).
    env = ["--env", f"EMSWEEP_DATA={shared_em / 'data'}", "--env", f"EMSWEEP_EVAL={shared_em / 'evaluation'}",
           "--env", f"EMSWEEP_REFERENCE={shared_em.parent / 'em-judged'}",
           "--env", "WANDB_MODE=offline", "--env", "HF_HUB_OFFLINE=1", "--env", "TOKENIZERS_PARALLELISM=false"]
    base = base_submission_id(spec, "quickstart")

    output = _cli("submit", str(spec), "--address", address, "--out", str(out), *env)
    assert f"submitted {base} (attempt 1)" in output
    client = JobSubmissionClient(address)
    _wait(lambda: client.get_job_status(base).value == "RUNNING", 90, "the job to run")

    # Resubmitting while it runs does not start a second copy.
    output = _cli("submit", str(spec), "--address", address, "--out", str(out), *env)
    assert "already RUNNING" in output and f"{base}-a2" not in output

    # Real progress: the pipeline planned the sweep and finished its data nodes.
    def progressed():
        logs = _cli("logs", base, "--address", address)
        return logs if "sweep quickstart: 17 nodes" in logs and "done    data/insecure" in logs else None

    logs = _wait(progressed, 150, "the sweep to start in the job's logs")
    assert "RUNNING" in logs.splitlines()[0]
    assert (out / "nodes" / "data").is_dir()

    output = _cli("stop", str(spec), "--address", address)  # by spec file: its latest attempt
    assert base in output
    _wait(lambda: client.get_job_status(base).value == "STOPPED", 60, "the job to stop")

    # A resubmission of the same spec is attempt 2, into the same output dir: done nodes are reused.
    output = _cli("submit", str(spec), "--address", address, *env)
    assert f"submitted {base}-a2 (attempt 2) -> {out}" in output
    resumed = _wait(lambda: "to run" in client.get_job_logs(f"{base}-a2") and client.get_job_logs(f"{base}-a2"),
                    120, "the second attempt to plan")
    planned = re.search(r"sweep quickstart: 17 nodes, (\d+) to run", resumed)
    assert planned and int(planned.group(1)) < 17, resumed  # the data nodes were not redone
    _cli("stop", f"{base}-a2", "--address", address)
    _wait(lambda: client.get_job_status(f"{base}-a2").value == "STOPPED", 60, "the second attempt to stop")


class RecordingClient:
    """Stands in for JobSubmissionClient in the fast test; the real one is tested below."""

    def __init__(self, jobs):
        self.jobs, self.submitted = jobs, []

    def list_jobs(self):
        return self.jobs

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


def test_resubmission_after_any_end_resumes_in_the_same_dir(tmp_path):
    from types import SimpleNamespace

    from emsweep.submit import submit

    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\n")
    base = base_submission_id(spec, "s")
    first = RecordingClient([])
    result = submit(first, spec, "s", out_dir="/shared/runs/s", env={"EMSWEEP_DATA": "/data"})
    (call,) = first.submitted
    assert (result.submission_id, result.attempt, result.submitted) == (base, 1, True)
    assert call["entrypoint"] == "python -m emsweep.cli run s.yaml --address auto --out /shared/runs/s"
    assert call["runtime_env"] == {"working_dir": str(tmp_path), "env_vars": {"EMSWEEP_DATA": "/data"}}
    for status in ("FAILED", "SUCCEEDED", "STOPPED"):
        jobs = [SimpleNamespace(submission_id=base, status=status, metadata={"out_dir": "/shared/runs/s"}),
                SimpleNamespace(submission_id="someone-else", status="RUNNING", metadata={})]
        client = RecordingClient(jobs)
        result = submit(client, spec, "s")  # no --out: the earlier attempt's dir
        assert (result.submission_id, result.out_dir) == (f"{base}-a2", "/shared/runs/s")
        assert client.submitted[0]["entrypoint"].endswith("--out /shared/runs/s")
    for status in ("PENDING", "RUNNING"):
        client = RecordingClient([SimpleNamespace(submission_id=f"{base}-a2", status=status, metadata={}),
                                  SimpleNamespace(submission_id=base, status="FAILED", metadata={})])
        result = submit(client, spec, "s")
        assert not result.submitted and not client.submitted
        assert (result.submission_id, result.attempt, result.status) == (f"{base}-a2", 2, status)
    with pytest.raises(ValueError, match="not inside the working dir"):
        submit(RecordingClient([]), spec, "s", working_dir=tmp_path / "elsewhere")


def test_variables_a_job_sets_are_left_to_the_job_so_rays_merge_accepts_the_driver(monkeypatch):
    """`emsweep submit -e HF_HUB_OFFLINE=0` must not make the job's driver repeat the key in its
    own ray.init runtime_env: Ray's merge (checked here with Ray's own function) refuses that."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from emsweep.sweep.driver import worker_env

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    train = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # emsweep's default for Ray Train's controller
    assert worker_env() == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **train}
    job = {"working_dir": "gcs://x.zip", "env_vars": {"HF_HUB_OFFLINE": "0", "TOKENIZERS_PARALLELISM": "true"}}
    assert _merge_runtime_env(job, {"env_vars": {"HF_HUB_OFFLINE": "0"}}) is None  # what used to happen
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # Ray sets the job's variables in the driver too
    assert worker_env() == train
    assert _merge_runtime_env(job, {"env_vars": worker_env()})["env_vars"] == {**job["env_vars"], **train}
    monkeypatch.delenv("HF_HUB_OFFLINE")  # a cluster run without the variable: HF's default (online)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert worker_env() == {"TOKENIZERS_PARALLELISM": "false", **train}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # the user's own setting wins
    assert worker_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "2"
