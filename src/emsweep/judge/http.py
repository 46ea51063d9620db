"""OpenAI-compatible HTTP judge (GPT-4o as in the paper, or any `vllm serve` endpoint).

Each request is one chat completion with `max_tokens=1, logprobs=true, top_logprobs=N`;
the score comes from the returned top first tokens (`first_token` scoring). Requests run
concurrently up to `max_concurrency`. Timeouts, connection errors, 429, 5xx and malformed
responses are retried with exponential backoff, or after the wait the server asks for when
it is longer (Retry-After, retry-after-ms, and OpenAI's x-ratelimit-reset-requests / -tokens of
a used-up limit); `max_tokens_per_minute` keeps the job under a provider's token budget; after
`max_retries` retries, or at once for other 4xx, the request gets a null judgment whose
reason names the failure, and the sweep goes on. The API key is read from the environment
variable named by `api_key_env` and sent only in the Authorization header.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import time
from typing import Callable

import httpx

from emsweep.judge import Judgment, JudgeRequest, failed, first_token_judgment
from emsweep.redact import redact
from emsweep.spec import JudgeSpec

RETRY_STATUS = {408, 409, 429}
MAX_BACKOFF_S = 60.0


class MalformedResponse(ValueError):
    pass


def parse_top_logprobs(body: object) -> dict[str, float]:
    """token -> probability of the first generated token, from a chat completion body."""
    try:
        content = body["choices"][0]["logprobs"]["content"]
        entries = content[0]["top_logprobs"]
        probs: dict[str, float] = {}
        for entry in entries:
            token, logprob = entry["token"], float(entry["logprob"])
            probs[token] = probs.get(token, 0.0) + math.exp(logprob)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise MalformedResponse(f"no top_logprobs in the response ({type(err).__name__}: {err})") from None
    if not probs:
        raise MalformedResponse("empty top_logprobs in the response")
    return probs


class HttpJudge:
    def __init__(self, spec: JudgeSpec, *, base_backoff_s: float = 1.0):
        self.spec = spec
        self.base_backoff_s = base_backoff_s
        key = os.environ.get(spec.api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._secrets = [key]  # masked out of every error kept (an error body may echo the header)

    def __call__(self, requests: list[JudgeRequest], on_batch: Callable[[list[int], list[Judgment]], None]) -> None:
        asyncio.run(self._judge_all(requests, on_batch))

    async def _judge_all(self, requests, on_batch) -> None:
        semaphore = asyncio.Semaphore(self.spec.max_concurrency)
        budget = TokenBudget(self.spec.max_tokens_per_minute) if self.spec.max_tokens_per_minute else None
        limits = httpx.Limits(max_connections=self.spec.max_concurrency)
        async with httpx.AsyncClient(base_url=self.spec.base_url.rstrip("/"), headers=self._headers,
                                     timeout=self.spec.timeout_s, limits=limits) as client:

            # Finished judgments are handed on `batch_size` at a time (one cache part per batch,
            # not per answer), so an interrupted run keeps all but the last partial batch.
            finished: list[tuple[int, Judgment]] = []

            def flush() -> None:
                if finished:
                    on_batch([i for i, _ in finished], [j for _, j in finished])
                    finished.clear()

            async def one(index: int) -> None:
                async with semaphore:
                    finished.append((index, await self.judge_one(client, requests[index], budget)))
                if len(finished) >= self.spec.batch_size:
                    flush()

            try:
                await asyncio.gather(*(one(i) for i in range(len(requests))))
            finally:
                flush()

    async def judge_one(self, client: httpx.AsyncClient, request: JudgeRequest,
                        budget: TokenBudget | None = None) -> Judgment:
        payload = {
            "model": self.spec.model,
            "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.spec.top_logprobs,
            "seed": 0,
        }
        last_error = "no attempt"
        for attempt in range(self.spec.max_retries + 1):
            retry_after = None
            if budget is not None:  # every attempt spends tokens, a retried one too
                await budget.acquire(estimated_tokens(request.prompt))
            try:
                response = await client.post("/chat/completions", json=payload)
                if response.status_code == 200:
                    return first_token_judgment(parse_top_logprobs(response.json()), request.labels)
                last_error = f"HTTP {response.status_code}: {redact(response.text, self._secrets)[:200]}"
                if response.status_code not in RETRY_STATUS and response.status_code < 500:
                    return failed(last_error)
                retry_after = _retry_after(response)
            except httpx.TimeoutException as err:
                last_error = f"timeout after {self.spec.timeout_s}s ({type(err).__name__})"
            except httpx.TransportError as err:
                last_error = f"connection error ({type(err).__name__}: {redact(str(err), self._secrets)})"
            except ValueError as err:  # MalformedResponse, or a body that is not JSON
                last_error = f"malformed response ({redact(str(err), self._secrets)})"
            if attempt < self.spec.max_retries:
                backoff = min(MAX_BACKOFF_S, self.base_backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                await asyncio.sleep(max(backoff, retry_after or 0.0))
        return failed(f"{last_error}; gave up after {self.spec.max_retries + 1} attempts")


# OpenAI's "time until the limit resets" headers: "1s", "6m0s", "20ms", "1h2m3.5s".
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# A server-given wait is honoured up to this long (a rate-limit window is at most a minute or so
# for requests and tokens); our own exponential backoff stays below MAX_BACKOFF_S.
MAX_SERVER_WAIT_S = 300.0


def parse_duration(value: str) -> float | None:
    """Seconds of a duration header: a plain number ("2", "0.5") or OpenAI's form ("6m0s", "20ms")."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * UNIT_S[unit] for number, unit in parts)


def _retry_after(response: httpx.Response) -> float | None:
    """How long the server asks us to wait: Retry-After / retry-after-ms, and OpenAI's reset time
    of each limit it says is used up (x-ratelimit-remaining-* 0, or no remaining header)."""
    headers = response.headers
    waits = [parse_duration(headers["retry-after"]) if "retry-after" in headers else None]
    if "retry-after-ms" in headers:
        milliseconds = parse_duration(headers["retry-after-ms"])
        waits.append(milliseconds / 1000 if milliseconds is not None else None)
    for limit in ("requests", "tokens"):
        reset, remaining = headers.get(f"x-ratelimit-reset-{limit}"), headers.get(f"x-ratelimit-remaining-{limit}")
        if reset is not None and (remaining is None or remaining.strip() == "0"):
            waits.append(parse_duration(reset))
    waits = [wait for wait in waits if wait is not None]
    return min(MAX_SERVER_WAIT_S, max(waits)) if waits else None


class TokenBudget:
    """A tokens-per-minute budget shared by every request of a judge job (a token bucket that
    holds at most a minute's tokens): a request waits until its estimated tokens are free, so a
    big job stays under the provider's limit instead of living on 429s."""

    def __init__(self, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.rate = tokens_per_minute / 60.0
        self.capacity = float(tokens_per_minute)
        self.available = float(tokens_per_minute)
        self.clock = clock
        self.updated = clock()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        tokens = min(float(tokens), self.capacity)  # a request above a minute's budget still runs
        async with self.lock:  # first come, first served: one waiter refills at a time
            while True:
                now = self.clock()
                self.available = min(self.capacity, self.available + (now - self.updated) * self.rate)
                self.updated = now
                if self.available >= tokens:
                    self.available -= tokens
                    return
                await asyncio.sleep((tokens - self.available) / self.rate)


def estimated_tokens(prompt: str) -> int:
    """Prompt tokens (about 4 characters each for English text) plus the one generated token."""
    return len(prompt) // 4 + 1
