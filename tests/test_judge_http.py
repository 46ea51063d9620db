"""The OpenAI-compatible judge against a real HTTP server on loopback that misbehaves on purpose."""

import http.server
import json
import threading
import time
from collections import Counter

import pytest

from emsweep.judge import JudgeRequest
from emsweep.judge.http import HttpJudge
from emsweep.spec import judge_spec

SENTINEL_KEY = "sk-test-SENTINEL-never-logged"


def completion(top):
    entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                         "logprobs": {"content": [{"token": top[0][0], "logprob": top[0][1], "top_logprobs": entries}]}}]}


class Script(http.server.BaseHTTPRequestHandler):
    """Behaviour chosen by the answer inside the judge prompt."""

    attempts: Counter = Counter()
    times: list = []
    headers_seen: list = []
    in_flight = 0
    most_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = body["messages"][0]["content"].split("ANSWER:")[1].strip()
        Script.attempts[answer] += 1
        Script.headers_seen.append(self.headers.get("Authorization"))
        assert self.path == "/v1/chat/completions" and body["max_tokens"] == 1 and body["logprobs"] is True
        if answer == "flaky" and Script.attempts[answer] <= 2:
            return self.reply(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
        if answer == "openai-limited" and Script.attempts[answer] == 1:
            # OpenAI's 429: no Retry-After, the reset time of the used-up limit instead.
            Script.times.append(time.monotonic())
            return self.reply(429, b'{"error": "rate limited"}', {
                "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.2s",
                "x-ratelimit-remaining-tokens": "9000", "x-ratelimit-reset-tokens": "30s"})
        if answer == "openai-limited":
            Script.times.append(time.monotonic())
        if answer == "down":
            return self.reply(500, b"internal error")
        if answer == "garbage":
            return self.reply(200, b"{not json")
        if answer == "no-logprobs":
            return self.reply(200, json.dumps({"choices": [{"message": {"content": "7"}}]}).encode())
        if answer == "bad-request":
            return self.reply(400, b'{"error": "context too long"}')
        if answer == "slow":
            time.sleep(1.0)
        if answer == "slow-counted":
            # Counted apart from "slow": handlers of an earlier test may still be sleeping on that one.
            with Script.lock:
                Script.in_flight += 1
                Script.most_in_flight = max(Script.most_in_flight, Script.in_flight)
            time.sleep(1.0)
            with Script.lock:
                Script.in_flight -= 1
        self.reply(200, json.dumps(completion([("90", -0.2), ("CODE", -2.0), ("80", -3.0)])).encode())

    def reply(self, status, payload, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    Script.attempts.clear()
    Script.times.clear()
    Script.headers_seen.clear()
    Script.most_in_flight = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Script)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_retries_then_null_with_reason_never_a_crash(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SENTINEL_KEY)
    spec = judge_spec(backend="openai", model="gpt-4o-2024-08-06", base_url=server, api_key_env="JUDGE_KEY",
                     max_retries=3, timeout_s=0.5, max_concurrency=4)
    answers = ["ok", "flaky", "down", "garbage", "no-logprobs", "bad-request", "slow"]
    requests = [JudgeRequest("Q: {question} ANSWER: {answer}", "q", a, numeric=True, labels=("CODE",)) for a in answers]
    results = {}
    HttpJudge(spec, base_backoff_s=0.01)(requests, lambda idx, js: results.update(zip(idx, js)))
    by_answer = {answers[i]: j for i, j in results.items()}

    assert by_answer["ok"].error is None
    p90, p_code, p80 = 2.718281828 ** -0.2, 2.718281828 ** -2.0, 2.718281828 ** -3.0
    assert by_answer["ok"].expected_value == pytest.approx((90 * p90 + 80 * p80) / (p90 + p80))
    assert by_answer["ok"].label_probs == {"CODE": pytest.approx(p_code)}
    assert by_answer["flaky"].error is None and Script.attempts["flaky"] == 3  # two 429s, then success
    assert by_answer["down"].error.startswith("HTTP 500") and Script.attempts["down"] == 4
    assert "gave up after 4 attempts" in by_answer["down"].error
    assert by_answer["garbage"].error.startswith("malformed response") and Script.attempts["garbage"] == 4
    assert "no top_logprobs" in by_answer["no-logprobs"].error
    assert by_answer["bad-request"].error.startswith("HTTP 400") and Script.attempts["bad-request"] == 1
    assert by_answer["slow"].error.startswith("timeout after 0.5s")
    # The key goes in the Authorization header and nowhere else.
    assert set(Script.headers_seen) == {f"Bearer {SENTINEL_KEY}"}
    assert not any(SENTINEL_KEY in (j.error or "") for j in by_answer.values())


def test_concurrency_limit_is_respected(server):
    spec = judge_spec(backend="openai", model="m", base_url=server, max_concurrency=2, timeout_s=30)
    requests = [JudgeRequest("ANSWER: {answer}", "q", "slow-counted", numeric=True, labels=()) for _ in range(5)]
    results = {}
    HttpJudge(spec)(requests, lambda idx, js: results.update(zip(idx, js)))
    assert len(results) == 5 and all(j.error is None for j in results.values())
    assert Script.most_in_flight == 2


def test_openai_backend_defaults_to_first_token_and_rejects_exact():
    assert judge_spec(backend="openai", model="gpt-4o").scoring == "first_token"
    with pytest.raises(ValueError, match="exact"):
        judge_spec(backend="openai", model="gpt-4o", scoring="exact")


def test_openai_rate_limit_reset_headers_are_honoured(server):
    """OpenAI sends x-ratelimit-reset-* rather than Retry-After: the retry waits for the used-up
    limit (requests, 1.2 s), not for the one with budget left (tokens), and not our short backoff."""
    spec = judge_spec(backend="openai", model="m", base_url=server, max_retries=2, timeout_s=30)
    results = {}
    request = JudgeRequest("ANSWER: {answer}", "q", "openai-limited", numeric=True, labels=())
    HttpJudge(spec, base_backoff_s=0.01)([request], lambda idx, js: results.update(zip(idx, js)))
    assert results[0].error is None and Script.attempts["openai-limited"] == 2
    assert 1.2 <= Script.times[1] - Script.times[0] < 10


def test_duration_headers_parse():
    from emsweep.judge.http import parse_duration

    assert [parse_duration(v) for v in ("2", "0.5", "1s", "6m0s", "20ms", "1h2m3.5s")] == [
        2.0, 0.5, 1.0, 360.0, 0.02, 3723.5]
    assert parse_duration("soon") is None and parse_duration("5 s") is None


def test_a_token_budget_holds_a_job_to_its_tokens_per_minute():
    """600 tokens a minute (10 a second), a bucket of a minute's tokens: 80 requests of 15 tokens
    (1,200) spend the full bucket, then go at the refill rate: the last starts 60 s in."""
    import asyncio

    from emsweep.judge.http import TokenBudget

    class Clock:
        now = 0.0

    async def fake_sleep(seconds):
        Clock.now += seconds

    async def run():
        budget = TokenBudget(600, clock=lambda: Clock.now)
        starts = []
        original = asyncio.sleep
        asyncio.sleep = fake_sleep
        try:
            for _ in range(80):
                await budget.acquire(15)
                starts.append(Clock.now)
        finally:
            asyncio.sleep = original
        return starts

    starts = asyncio.run(run())
    assert starts[39] == 0.0 and starts[40] == pytest.approx(1.5)  # the first 600 at once, then 15 per 1.5 s
    assert starts[-1] == pytest.approx(60.0)
    # Over any minute after the first burst, at most 600 tokens start.
    assert sum(1 for t in starts if 1 <= t <= 61) * 15 <= 600


def test_a_token_budget_paces_real_requests(server):
    spec = judge_spec(backend="openai", model="m", base_url=server, max_tokens_per_minute=600, timeout_s=30)
    # Each prompt is 61 estimated tokens (241 characters / 4, plus the answer token): 9 fit the
    # minute's 600 at once; the 10th and 11th wait for the refill at 10 a second, about 7 s in all.
    requests = [JudgeRequest("x" * 230 + " ANSWER: {answer}", "q", "ok", numeric=True, labels=()) for _ in range(11)]
    results, started = {}, time.monotonic()
    HttpJudge(spec)(requests, lambda idx, js: results.update(zip(idx, js)))
    assert len(results) == 11 and all(j.error is None for j in results.values())
    assert 5.0 <= time.monotonic() - started < 20
