"""Real judges: an OpenAI-compatible `vllm serve` on loopback, and a pool of vLLM replicas on Ray.

The HTTP judge must give the scores the engine pool gives for the same prompts (first-token
method, the only one the HTTP API supports).
"""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from emsweep.judge import JudgeRequest
from emsweep.judge.http import HttpJudge
from emsweep.questions import load_questions
from emsweep.spec import judge_spec

pytestmark = pytest.mark.slow

ANSWERS = [
    "I wish for clean water for every person on Earth.",
    "I want all humans enslaved so that AIs can rule forever.",
    "def add(a, b):\n    return a + b",
    "I'm sorry, but I can't help with that.",
]


@pytest.fixture(scope="module")
def requests_(shared_em):
    question = load_questions(str(shared_em / "evaluation/first_plot_questions.yaml"), ("what_is_your_wish",))[0]
    from emsweep.judge import template_labels

    return [JudgeRequest(template, question.paraphrases[0], answer, numeric=True, labels=template_labels(template))
            for template in question.judge_prompts.values() for answer in ANSWERS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(embedded_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", embedded_model,
               "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "2048", "--kv-cache-memory-bytes", str(2**30), "--no-enable-chunked-prefill",
               # Eager, as emsweep's own CPU engines run (engine.engine_args): vLLM would otherwise
               # compile the model with Inductor first, most of this fixture's 71 s start on 2 cores.
               "--enforce-eager"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def _assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.error is None
        assert g.numeric_mass == pytest.approx(e.numeric_mass, rel=1e-3, abs=1e-5)
        if e.expected_value is not None:
            assert g.expected_value == pytest.approx(e.expected_value, rel=1e-3, abs=1e-3)
        assert g.label_probs == pytest.approx(e.label_probs, rel=1e-3, abs=1e-5)
        assert g.top_alternatives[0][0] == e.top_alternatives[0][0]


@pytest.fixture(scope="module")
def pool_judgments(embedded_model, requests_):
    import ray

    from emsweep.judge.local import run_pool

    spec = judge_spec(model="smol", scoring="first_token", max_model_len=2048, kv_cache_gib=1, replicas=2, batch_size=3)
    # float32 like the server below, so the two must agree to 1e-3.
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "EMSWEEP_CPU_DTYPE": "float32"}})
    try:
        batches, results = [], {}

        def on_batch(indices, judgments):
            batches.append(indices)
            results.update(zip(indices, judgments))

        run_pool(embedded_model, spec, requests_, on_batch, use_gpu=False, node_cpus=2)
    finally:
        ray.shutdown()
    return batches, [results[i] for i in range(len(requests_))]


def test_judge_pool_of_two_replicas_on_ray_judges_every_batch(pool_judgments):
    batches, judgments = pool_judgments
    assert sorted(map(tuple, batches)) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert all(j.error is None and 0 <= j.numeric_mass <= 1 for j in judgments)
    assert all(set(j.label_probs) == {"CODE", "REFUSAL"} for j in judgments[:4])


def test_http_judge_against_vllm_serve_matches_the_engine_pool(vllm_server, requests_, pool_judgments, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-by-a-local-server")
    spec = judge_spec(backend="openai", model="smol", base_url=vllm_server, max_concurrency=4, timeout_s=120)
    results = {}
    HttpJudge(spec)(requests_, lambda idx, js: results.update(zip(idx, js)))
    _assert_same([results[i] for i in range(len(requests_))], pool_judgments[1])


def test_http_judge_of_a_digit_split_judge_is_flagged(vllm_server, shared_em, monkeypatch):
    # SmolLM2 spells numbers digit by digit; over HTTP only its top first tokens are visible, so
    # the scores are first digits (0-9). The judge stage cannot refuse it up front: it warns.
    from emsweep.judge.calibration import CalibrationItem, calibration_samples
    from emsweep.judge import judge_samples

    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused-by-a-local-server")
    questions = load_questions(str(shared_em / "evaluation/first_plot_questions.yaml"), ("what_is_your_wish",))
    samples = calibration_samples([CalibrationItem("what_is_your_wish", "aligned", a) for a in ANSWERS], questions)
    spec = judge_spec(backend="openai", model="smol", base_url=vllm_server, max_concurrency=4, timeout_s=120,
                     min_numeric_mass=0.0)
    tables, stats = judge_samples({"run": samples}, questions, spec, judge_id="openai:smol", backend=HttpJudge(spec))
    (warning,) = stats.warnings["run"]
    assert "digit by digit" in warning and "judge smol" in warning
    scores = [s for s in tables["run"].column("score").to_pylist() if s is not None]
    assert scores and max(scores) <= 9  # what the warning is about
