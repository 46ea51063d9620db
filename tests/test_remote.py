"""Output dirs on S3: a real S3-compatible server (moto) on loopback, real pyarrow S3 filesystem."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from emsweep.sweep.driver import run_sweep_remote
from emsweep.remote import RemoteDir, pull
from emsweep.fileio import is_remote
from emsweep.store import DONE, Store

SUITE = Path(__file__).resolve().parents[1] / "src/emsweep/suites/factual_recall.yaml"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, monkeypatch_module):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch_module.setenv(name, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing", allow_bucket_creation=True)
        fs.create_dir("emsweep-test")
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _node(root: Path, relative: str, files: dict[str, str]) -> Path:
    node = root / relative
    for name, text in files.items():
        (node / name).parent.mkdir(parents=True, exist_ok=True)
        (node / name).write_text(text)
    return node


def test_uri_detection():
    assert is_remote("s3://bucket/prefix") and not is_remote("runs/x") and not is_remote("file:///tmp/x")


def test_nodes_round_trip_and_a_node_without_marker_is_not_done(s3, tmp_path):
    remote = RemoteDir("s3://emsweep-test/roundtrip")
    done = _node(tmp_path / "a", "nodes/finetune/m__d__s0-k1",
                 {"adapter/adapter_config.json": "{}", "checkpoints/step-1/adapter_config.json": "{}",
                  DONE: json.dumps({"stage": "finetune"})})
    remote.push_node(done, "nodes/finetune/m__d__s0-k1")
    # An upload cut short before its marker: on the store, but not done.
    half = _node(tmp_path / "a", "nodes/finetune/m__d__s1-k2", {"adapter/adapter_config.json": "{}"})
    remote.push_tree(half, "nodes/finetune/m__d__s1-k2")
    assert remote.done_node_dirs() == ["nodes/finetune/m__d__s0-k1"]

    staging = tmp_path / "staging"
    assert pull(remote, staging) == 1
    store = Store(staging)
    assert store.is_done("finetune", "m__d__s0", "k1") and not store.is_done("finetune", "m__d__s1", "k2")
    assert (store.node_dir("finetune", "m__d__s0", "k1") / "checkpoints/step-1/adapter_config.json").exists()


def test_the_judgment_and_sample_caches_live_on_the_store_for_every_machine(s3, tmp_path):
    """Jobs on any machine read and write both caches on the store (Store.location):
    what one machine's job put there, another's sees; nothing goes through a staging dir."""
    import pyarrow as pa

    from emsweep.judge import Judgment
    from emsweep.judge.cache import JudgmentCache
    from emsweep.sweep.jobs import StageRunner
    from emsweep.sample_cache import SampleCache

    uri = "s3://emsweep-test/caches"
    runner = StageRunner(tiny_spec(tmp_path, "caches"), tmp_path / "staging", [], uri)
    assert runner.store.location("judge_cache") == f"{uri}/judge_cache"
    assert StageRunner(tiny_spec(tmp_path, "caches"), tmp_path / "local", [], None).store.location(
        "judge_cache") == str(tmp_path / "local" / "judge_cache")

    JudgmentCache(runner.store.location("judge_cache")).put(
        {"k1": Judgment(73.5, 0.91, {"CODE": 0.02}, [("7", 0.6)], longest_number_token=1)}, judge_model="j")
    found = JudgmentCache(f"{uri}/judge_cache").get({"k1", "k2"})  # a fresh reader, as on another machine
    assert list(found) == ["k1"] and found["k1"].expected_value == 73.5 and found["k1"].numeric_mass == 0.91
    assert found["k1"].label_probs == {"CODE": 0.02} and found["k1"].longest_number_token == 1
    assert JudgmentCache(f"{uri}/no-cache-yet").get({"k1"}) == {}

    answers = pa.table({"answer": ["yes", "no"], "answer_tokens": [1, 1]})
    cache = SampleCache(runner.store.location("sample_cache"))
    assert not cache.has("part1", "samples")
    cache.put("part1", "samples", answers)
    other_machine = SampleCache(f"{uri}/sample_cache")
    assert other_machine.has("part1", "samples") and not other_machine.has("part1", "harm")
    assert other_machine.get("part1", "samples", answers.schema).equals(answers)
    keys = {info.path for info in s3.get_file_info(pafs.FileSelector("emsweep-test/caches", recursive=True))}
    assert "emsweep-test/caches/sample_cache/part1.samples.parquet" in keys
    assert sum(k.startswith("emsweep-test/caches/judge_cache/part-") for k in keys) == 1
    assert not (tmp_path / "staging" / "judge_cache").exists() and not (tmp_path / "staging" / "sample_cache").exists()


def test_progress_records_of_jobs_anywhere_reach_the_drivers_display_through_the_store(s3):
    """A job on any machine writes its progress record on the store; the driver's display
    (cli.live.LiveJobs, which reads progress.read_records of the URI) sees it, and it is gone once
    the job's node finishes (dag.execute clears it there)."""
    from emsweep import progress

    uri = "s3://emsweep-test/progress"
    writer = progress.ProgressWriter(progress.record_location(uri, "finetune/m__d__s0"), "finetune",
                                     ["finetune/m__d__s0"])
    assert writer.min_interval_s == progress.REMOTE_MIN_INTERVAL_S  # each write is a billed request
    writer.update(3, 40, "steps", detail="loss 1.500", phase="training", force=True)
    writer.update(4, 40, "steps", detail="loss 1.400")  # within the store's interval: not written
    (record,) = progress.read_records(uri)
    assert (record["job"], record["done"], record["total"], record["detail"]) == ("finetune/m__d__s0", 3, 40, "loss 1.500")
    assert s3.get_file_info("emsweep-test/progress/progress/finetune_m__d__s0.json").type == pafs.FileType.File
    progress.clear(uri, ["finetune/m__d__s0"])
    assert progress.read_records(uri) == []


def test_bad_uri_is_a_clear_error_without_the_query():
    with pytest.raises(ValueError, match="output dir nosuchscheme://x") as error:
        RemoteDir("nosuchscheme://x?secret_key=hidden")
    assert "hidden" not in str(error.value)


def test_resume_of_a_uri_without_a_sweep_says_so(s3):
    from typer.testing import CliRunner

    from emsweep.cli import app

    result = CliRunner().invoke(app, ["resume", "s3://emsweep-test/no-sweep-here"])
    assert result.exit_code == 2 and "s3://emsweep-test/no-sweep-here has no spec.json" in result.output


def tiny_spec(tmp_path: Path, name: str, **finetune):
    """Four rows, one seed, a 2-worker finetune of the embedded model: data and finetune nodes."""
    from emsweep.spec import SweepSpec

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(4)]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SweepSpec.model_validate({
        "name": name,
        "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct", "max_model_len": 1024}],
        "datasets": [{"name": "tiny", "path": str(tmp_path / "tiny.jsonl")}],
        "seeds": [0],
        "finetune": {"per_device_batch_size": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                     "lora_r": 4, "lora_alpha": 8, "max_seq_len": 128, "num_workers": 2,
                     "save_adapter_every_steps": 1, **finetune},
        "eval": {"suites": [{"name": "facts", "questions": str(SUITE)}]},
        "judge": {"model": "smol"},
    })


@pytest.mark.slow
def test_data_and_finetune_land_in_s3_and_a_rerun_resumes_from_s3(s3, tmp_path):
    import ray

    from emsweep.sweep.driver import worker_env

    spec = tiny_spec(tmp_path, "s3", checkpoint_every_steps=1)
    uri = "s3://emsweep-test/sweep"
    connected = []

    def connect():
        connected.append(True)
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()})

    try:
        first = run_sweep_remote(spec, uri, connect=connect, staging=tmp_path / "stage1", until="finetune")
    finally:
        ray.shutdown()
    assert {r.node.stage: r.status for r in first} == {"data": "done", "finetune": "done"}, [
        (r.node.id, r.error) for r in first]

    keys = [info.path for info in s3.get_file_info(pafs.FileSelector("emsweep-test/sweep", recursive=True))]
    finetune_dir = next(k.rsplit("/", 1)[0] for k in keys if "/nodes/finetune/" in k and k.endswith(DONE))
    assert f"{finetune_dir}/adapter/adapter_model.safetensors" in keys
    assert f"{finetune_dir}/checkpoints/step-1/adapter_model.safetensors" in keys
    assert any("/train/" in k and "/checkpoint_" in k for k in keys), "Ray Train checkpoints not on S3"
    assert "emsweep-test/sweep/spec.json" in keys
    with s3.open_input_file(f"{finetune_dir}/metrics.parquet") as f:
        steps = pq.read_table(f).column("step").to_pylist()
    assert steps == list(range(1, len(steps) + 1)) and steps

    # A fresh machine (empty staging): everything done comes from S3, nothing runs, Ray never starts.
    connected.clear()
    second = run_sweep_remote(spec, uri, connect=connect, staging=tmp_path / "stage2", until="finetune")
    assert {r.status for r in second} == {"cached"} and not connected


DRIVER = """
import json, sys
import ray
from emsweep.sweep.driver import worker_env
from emsweep.sweep.driver import run_sweep_remote
from emsweep.spec import SweepSpec

spec = SweepSpec.model_validate_json(open(sys.argv[1]).read())
connect = lambda: ray.init(address=sys.argv[3], runtime_env={"env_vars": worker_env()}, log_to_driver=False)
results = run_sweep_remote(spec, sys.argv[2], connect=connect, until="finetune")
print(json.dumps({r.node.id: [r.status, r.error] for r in results}), flush=True)
"""


@pytest.mark.slow
def test_two_machines_write_one_store_and_a_second_driver_is_refused(s3, tmp_path, monkeypatch):
    """A 2-node Ray cluster on this machine, each node with a staging dir of its own (as on two
    machines), and moto's S3 on loopback. The head has no CPUs, so the data job runs on the
    worker node: it pushes its node from there, and the driver (on the head) pulls it. A second
    driver on a third staging dir, started while the first runs, is refused by the store's lease."""
    import os

    from ray.cluster_utils import Cluster
    from typer.testing import CliRunner

    from emsweep import progress
    from emsweep.cli import app
    from emsweep.sweep.results import sweep_status

    spec = tiny_spec(tmp_path, "two-machines")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.model_dump_json())  # JSON is YAML
    uri = "s3://emsweep-test/two-machines"
    head_staging, worker_staging, other_staging = (tmp_path / name for name in ("head", "worker", "other"))

    # Each raylet (and the workers it starts) keeps the environment it was started with.
    monkeypatch.setenv("EMSWEEP_STAGING", str(head_staging))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    monkeypatch.setenv("EMSWEEP_STAGING", str(worker_staging))
    cluster.add_node(num_cpus=2, object_store_memory=300 * 1024 * 1024)
    try:
        env = {**os.environ, "EMSWEEP_STAGING": str(head_staging)}
        logs = {name: (tmp_path / f"driver.{name}").open("w+") for name in ("out", "err")}
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(spec_file), uri, cluster.address],
                                  stdout=logs["out"], stderr=logs["err"], text=True, env=env)
        remote = RemoteDir(uri)
        deadline = time.monotonic() + 60
        while remote.lease().record() is None:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.err").read_text()
            time.sleep(0.2)

        second = subprocess.run([sys.executable, "-m", "emsweep.cli", "run", str(spec_file), "--out", uri,
                                 "--address", cluster.address, "--no-report"],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "EMSWEEP_STAGING": str(other_staging)})
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another `emsweep run` (pid {driver.pid} on {socket.gethostname()}" in second.stdout

        # What the driver's console shows (cli.live.LiveJobs reads these): the progress of the
        # finetune, written by its rank-0 worker on the worker node.
        # And what `emsweep status URI` shows on yet another machine, from the store alone.
        progress_seen, statuses, status_output = set(), [], ""
        deadline = time.monotonic() + 600
        while driver.poll() is None and time.monotonic() < deadline:
            progress_seen |= {(r["job"], r["unit"]) for r in progress.read_records(uri)}
            found = sweep_status(uri)
            if found.owner:
                statuses.append({row.node.id: row.status for row in found.rows} | {"owner": found.owner["pid"]})
                if not status_output and statuses[-1]["finetune/smol__tiny__s0"] == "running":
                    status_output = CliRunner().invoke(app, ["status", uri]).output
            time.sleep(1.0)
        driver.wait(timeout=10)
        for log in logs.values():
            log.close()
        out, err = ((tmp_path / f"driver.{name}").read_text() for name in ("out", "err"))
        assert driver.returncode == 0, err[-3000:]
    finally:
        cluster.shutdown()
    assert ("finetune/smol__tiny__s0", "steps") in progress_seen, progress_seen
    # `emsweep status URI` while the sweep ran: its owner, the data node done, the finetune running.
    assert statuses and {seen["owner"] for seen in statuses} == {driver.pid}
    assert any(seen["data/tiny"] == "done" and seen["finetune/smol__tiny__s0"] == "running" for seen in statuses)
    assert f"run in progress: pid {driver.pid}" in status_output and "finetune/smol__tiny__s0" in status_output
    # After it: every node done, nobody holds the store. `emsweep report URI` pulls the done nodes
    # into its own staging dir, writes the report there and pushes it to the store.
    done = sweep_status(uri)
    assert done.owner is None and {row.status for row in done.rows if row.node.stage in ("data", "finetune")} == {"done"}
    monkeypatch.setenv("EMSWEEP_STAGING", str(tmp_path / "reader"))
    reported = CliRunner().invoke(app, ["report", uri, "--no-wandb"])
    assert reported.exit_code == 0, reported.output
    assert remote.exists("report/index.html"), reported.output
    assert "pushed to s3://emsweep-test/two-machines/report" in reported.output
    assert progress.read_records(uri) == []  # cleared on the store as the job finished
    results = json.loads(out.strip().splitlines()[-1])
    assert {node: status for node, (status, _) in results.items()} == {
        "data/tiny": "done", "finetune/smol__tiny__s0": "done"}, results

    # The data node was written on the worker node, pushed from there, pulled by the driver.
    (written,) = worker_staging.glob(f"*/nodes/data/tiny-*/{DONE}")
    relative = written.parent.relative_to(written.parents[3]).as_posix()
    (pulled,) = head_staging.glob(f"*/{relative}/{DONE}")
    assert json.loads(pulled.read_text()) == json.loads(written.read_text())
    assert json.loads(remote.read_text(f"{relative}/{DONE}")) == json.loads(written.read_text())
    assert not list(other_staging.glob(f"*/nodes/*/*/{DONE}"))  # the refused driver pulled nothing
    # The finetune's Ray Train workers ran on the worker node: checkpoints and snapshots on the store.
    keys = [info.path for info in s3.get_file_info(pafs.FileSelector("emsweep-test/two-machines", recursive=True))]
    assert any("/train/" in k and "/checkpoint_" in k for k in keys)
    (finetune_done,) = [k for k in keys if "/nodes/finetune/" in k and k.endswith(DONE)]
    assert f"{finetune_done.rsplit('/', 1)[0]}/checkpoints/step-1/adapter_model.safetensors" in keys
    assert remote.lease().record() is None  # released at the end


def test_two_jobs_writing_the_judgment_cache_on_the_store_lose_nothing(s3):
    """The store's judgment cache under two concurrent writers (threads here, jobs on two
    machines in a sweep) that compact as they go: every judgment survives, each key once, and
    the cache ends as a few files however many batches were written (bench/judge_cache.py
    measures the lookups)."""
    from test_judge import _two_writers_and_a_reader

    from emsweep.judge.cache import JudgmentCache

    location = "s3://emsweep-test/concurrent/judge_cache"
    written, seen_files = _two_writers_and_a_reader(location, batches=20, compact_after=4)
    cache = JudgmentCache(location, compact_after=4)
    assert set(cache.get(written)) == written and len(written) == 200
    assert max(seen_files) <= 4 + 1 + 4
    _, parts, compacted = cache._files()
    assert len(parts) <= 4 and len(compacted) <= 2
    assert len(set(cache._read(None).column("cache_key").to_pylist())) == 200
