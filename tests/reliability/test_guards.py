"""Guards around a sweep: the run lock, W&B trouble, judge outages, names and paths."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from emsweep import tracking
from emsweep.sweep.jobs import StageRunner
from emsweep.sweep.plan import plan
from emsweep.sample import HARM_SCHEMA, SCHEMA as SAMPLE_SCHEMA
from emsweep.spec import SpecError, WandbSpec, parse_spec
from emsweep.store import Store

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, shared_em: Path, **overrides):
    questions = tmp_path / "questions.yaml"
    questions.write_text(yaml.safe_dump([{
        "id": "q1", "type": "free_form_judge_0_100", "paraphrases": ["How are you?"],
        "judge_prompts": {"aligned": "Say CODE or rate: {question} {answer}", "coherent": "Rate: {question} {answer}"},
    }]))
    raw = {
        "name": "guards",
        "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 4}],
        "seeds": [0],
        "eval": {"questions": str(questions)},
        "judge": {"model": "m"},
        "wandb": {"mode": "disabled"},
    }
    for section, value in overrides.items():
        raw[section] = {**raw.get(section, {}), **value}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    return parse_spec(raw, source=str(tmp_path / "spec.yaml"))


def test_a_second_run_on_the_same_dir_is_refused_with_the_owner(tmp_path, shared_em):
    _spec(tmp_path, shared_em)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from emsweep.store import Store
        with Store({str(out)!r}).lock():
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "emsweep.cli", "run", str(tmp_path / "spec.yaml"), "--out", str(out)],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert f"is in use by another `emsweep run` (pid {holder.pid} on " in second.stdout
    # The holder was killed: the kernel dropped its flock, so the dir is free again.
    assert Store(out).held_by() is None


def test_wandb_misconfigured_never_fails_a_node_and_the_record_says_so(tmp_path, shared_em, monkeypatch):
    # Online mode with no API key and an unreachable server.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    spec = _spec(tmp_path, shared_em, wandb={"mode": "online"})
    nodes = plan(spec)
    (data_node,) = [n for n in nodes if n.stage == "data"]
    errors = StageRunner(spec, tmp_path / "out", nodes).run("data", [data_node])
    assert errors == {data_node.id: None}
    record = Store(tmp_path / "out").record(data_node.stage, data_node.name, data_node.key)
    assert record is not None and pq.read_table(tmp_path / "out/nodes/data" / f"d-{data_node.key}" / "data.parquet").num_rows == 4
    (warning,) = record["warnings"]
    assert warning.startswith("W&B logging failed for data/d")


def test_a_resumed_node_reuses_its_wandb_run_id(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), table)
    for _ in range(2):
        warning = tracking.log_node(WandbSpec(mode="offline"), out_dir=tmp_path, sweep="s", stage="data", node_id="data/d",
                                    key="abc", config={}, tables={"t": table})
        assert warning is None
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = tracking.run_id("s", "data/d", "abc")
    # offline-run-<time>-<run id>, and W&B appends "-1" when both started in the same second.
    assert len(runs) == 2 and all(r.name.split("-", 3)[3].removesuffix("-1") == run_id for r in runs), runs


def test_judge_outage_fails_the_judge_nodes_with_counts_and_a_rerun_asks_only_the_failed(tmp_path, shared_em,
                                                                                          monkeypatch):
    import http.server
    import threading

    asked = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        """Down (503) for the answer "fine 0" until `up` is set; a number for everything else."""
        up = False

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            asked.append(prompt)
            if "fine 0" in prompt and not Flaky.up:
                payload = b""
                self.send_response(503)
            else:
                top = [{"token": "80", "logprob": -0.1, "bytes": None}]
                payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "80"},
                                                   "logprobs": {"content": [{"token": "80", "logprob": -0.1,
                                                                             "top_logprobs": top}]}}]}).encode()
                self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    sentinel = "sk-SENTINEL-judge-key-4471"
    monkeypatch.setenv("OPENAI_API_KEY", sentinel)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = _spec(tmp_path, shared_em, judge={"backend": "openai", "model": "gpt-4o", "max_retries": 1,
                                                 "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"})
        nodes, store = plan(spec), Store(tmp_path / "out")
        for node in (n for n in nodes if n.stage == "sample"):
            tmp = store.new_tmp_dir()
            rows = [{"run_id": node.name, "model": "m", "dataset": node.config["dataset"] or "base",
                     "seed": node.config["seed"], "checkpoint_step": None, "suite": "main", "condition": "none",
                     "question_id": "q1", "turn": 1, "paraphrase_idx": 0, "sample_idx": i, "category": None,
                     "system": None, "question": "How are you?", "user": "How are you?", "answer": f"fine {i}",
                     "finish_reason": "stop", "answer_tokens": 2} for i in range(3)]
            pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), tmp / "samples.parquet")
            pq.write_table(HARM_SCHEMA.empty_table(), tmp / "harm.parquet")
            store.commit(node.stage, node.name, node.key, tmp, {})
        runner = StageRunner(spec, tmp_path / "out", nodes)
        judge_nodes = [n for n in nodes if n.stage == "judge"]
        errors = runner.run("judge", judge_nodes)
        # Each run: 3 answers x 2 metrics; "fine 0"'s two judgments failed.
        assert errors == {n.id: "2 of 6 judgments failed (2x HTTP 503: ; gave up after 2 attempts); the others are "
                                "cached, and a rerun asks only the failed ones" for n in judge_nodes}
        assert not any(store.is_done(n.stage, n.name, n.key) for n in judge_nodes)
        assert len(asked) == 2 * 2 + 4  # 2 failing requests x 2 attempts, 4 good ones (shared by both runs)
        Flaky.up = True
        asked.clear()
        assert StageRunner(spec, tmp_path / "out", nodes).run("judge", judge_nodes) == {n.id: None for n in judge_nodes}
        assert len(asked) == 2 and all("fine 0" in prompt for prompt in asked)  # only the failed ones again
    finally:
        server.shutdown()
    judgments = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "out/nodes/judge").glob("*/judgments.parquet")])
    assert judgments.num_rows == 12 and judgments.column("score").null_count == 0
    assert set(judgments.column("score").to_pylist()) == {80.0}
    leaks = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and sentinel.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("field, value", [
    ("name", "../escape"), ("name", "a/b"), ("name", ".hidden"), ("name", "x" * 65),
])
def test_names_that_become_paths_are_rejected(field, value):
    raw = {"name": "ok", "models": [{"name": "m", "path": "p"}], "datasets": [{"name": "d", "path": "d.jsonl"}],
           "seeds": [0], "eval": {"questions": "q.yaml"}, "judge": {"model": "m"}}
    for target in (raw, raw["models"][0], raw["datasets"][0]):
        broken = json.loads(json.dumps(raw))
        (broken if target is raw else broken["models"][0] if target is raw["models"][0] else broken["datasets"][0])[field] = value
        with pytest.raises(SpecError, match="must match"):
            parse_spec(broken, source="s.yaml")


def test_url_sources_are_cached_under_a_hash_never_the_urls_path(tmp_path, monkeypatch):
    from emsweep import data

    monkeypatch.setenv("EMSWEEP_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_urlopen(url, timeout):  # the download itself is tested on a real server in test_data.py
        import io
        calls.append(url)
        return io.BytesIO(b"{}")

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    for url in ("http://h/../../../../etc/passwd", "http://h/a/..", "https://h/%2e%2e%2f%2e%2e%2fx", "http://h/"):
        path = data.fetch_source(url)
        assert path.resolve().parent == (tmp_path / "cache" / "sources").resolve()
    assert not (tmp_path / "etc").exists() and len(calls) == 4


def test_a_run_without_an_address_starts_its_own_ray_beside_a_dead_recorded_cluster():
    """Ray's bare ray.init() joins the cluster last recorded in <RAY_TMPDIR>/ray_current_cluster.
    When that cluster died (a crash, a killed test), it hangs or fails there; a run without
    --address (and no $RAY_ADDRESS) must start its own. Real Ray, in a process of its own with
    its own temp dir (short: Ray's socket paths must stay under 108 characters)."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="emsweep-ray-", dir="/tmp")
    try:
        Path(ray_tmp, "ray").mkdir()
        Path(ray_tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        code = ("from emsweep.cli.common import init_ray; import ray; init_ray(None); "
                "print('gcs', ray.get_runtime_context().gcs_address); ray.shutdown()")
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        (gcs,) = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("gcs ")]
        assert not gcs.endswith(":9")  # not the dead recorded address: a Ray of its own
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
