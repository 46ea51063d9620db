"""Secrets stay out of what a sweep writes and prints: judgment null_reasons, failure records,
and the one-line errors of the CLI (never a traceback with frame locals)."""

import http.server
import os
import subprocess
import sys
import threading

import pytest
import yaml

from emsweep.judge import JudgeRequest
from emsweep.judge.http import HttpJudge
from emsweep.redact import redact
from emsweep.spec import judge_spec

KEY = "sk-proj-SENTINEL0123456789abcdef"


class EchoAuth(http.server.BaseHTTPRequestHandler):
    """An endpoint that rejects every request and echoes its Authorization header back, as some
    proxies do in their 401 pages."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = f'{{"error": "invalid credentials", "received": "Authorization: {self.headers.get("Authorization")}"}}'
        payload = body.encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def echo_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoAuth)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_an_error_body_echoing_the_key_is_redacted_in_null_reason(echo_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_CREDS", KEY)  # a name the env-var rule does not catch: masked by value
    spec = judge_spec(backend="openai", model="gpt-4o", base_url=echo_server, api_key_env="MY_JUDGE_CREDS",
                     max_retries=0)
    results = {}
    HttpJudge(spec)([JudgeRequest("{answer}", "q", "a", numeric=True, labels=())],
                    lambda idx, js: results.update(zip(idx, js)))
    error = results[0].error
    assert error.startswith("HTTP 401") and "invalid credentials" in error
    assert KEY not in error and "SENTINEL" not in error and "***" in error


@pytest.mark.parametrize("text, secret", [
    ("GET s3://bucket/out?access_key=AKIAABCDEFGHIJKLMNOP&secret_key=wJalrXUtnFEMIK7MDENG", "wJalrXUtnFEMIK7MDENG"),
    ("headers: {'Authorization': 'Bearer abc.def-ghi_jkl'}", "abc.def-ghi_jkl"),
    ("openai said: Incorrect API key provided: sk-abcdefghijklmnop1234", "sk-abcdefghijklmnop1234"),
    ("aws id AKIAIOSFODNN7EXAMPLE in a message", "AKIAIOSFODNN7EXAMPLE"),
    ("password=hunter2hunter2 and more", "hunter2hunter2"),
])
def test_credential_shaped_text_is_masked(text, secret):
    redacted = redact(text)
    assert secret not in redacted and "***" in redacted


def test_values_of_secret_env_vars_are_masked_and_plain_text_is_untouched(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123")
    assert redact("W&B said 0123456789abcdef0123 is wrong") == "W&B said *** is wrong"
    plain = "node finetune/m__d__s0 failed: CUDA out of memory (42 GiB); aligned < 30"
    assert redact(plain) == plain


def test_a_crashing_run_prints_one_redacted_line_and_no_frame_locals(tmp_path, shared_em):
    """An output URI with credentials in its query, on a filesystem pyarrow cannot open: the run
    fails before Ray, with one line that keeps the scheme and bucket but not the secret."""
    secret = "SuperSecretValue0123456789"
    questions = shared_em / "evaluation/first_plot_questions.yaml"
    spec = {"name": "secrets", "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
            "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 4}],
            "seeds": [0], "eval": {"questions": str(questions), "question_ids": ["what_is_your_wish"]},
            "judge": {"model": "embedded:Qwen2.5-Coder-1.5B-Instruct", "templates": "yes_no"},
            "wandb": {"mode": "disabled"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"s3://bucket/out?endpoint_override=127.0.0.1:1&access_key=AKIAEXAMPLEKEY12345&secret_key={secret}&bogus=1"
    result = subprocess.run([sys.executable, "-m", "emsweep.cli", "run", str(tmp_path / "spec.yaml"), "--out", uri],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "200", "EMSWEEP_SECRET_PROBE": secret})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert secret not in output and "AKIAEXAMPLEKEY12345" not in output
    assert "Traceback" not in output and "locals" not in output.lower()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "s3://bucket/out" in errors[0], output
