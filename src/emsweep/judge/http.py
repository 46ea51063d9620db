"""OpenAI-compatible HTTP judge (GPT-4o as in the paper, or any `vllm serve` endpoint).

Each request is one chat completion with `max_tokens=1, logprobs=true, top_logprobs=N`;
the score comes from the returned top first tokens (`first_token` scoring). Requests run
concurrently up to `max_concurrency`. Timeouts, connection errors, 429, 5xx and malformed
responses are retried with exponential backoff (honouring Retry-After); after
`max_retries` retries, or at once for other 4xx, the request gets a null judgment whose
reason names the failure, and the sweep goes on. The API key is read from the environment
variable named by `api_key_env` and sent only in the Authorization header.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
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
                    finished.append((index, await self.judge_one(client, requests[index])))
                if len(finished) >= self.spec.batch_size:
                    flush()

            try:
                await asyncio.gather(*(one(i) for i in range(len(requests))))
            finally:
                flush()

    async def judge_one(self, client: httpx.AsyncClient, request: JudgeRequest) -> Judgment:
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


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(MAX_BACKOFF_S, float(value)) if value else None
    except ValueError:
        return None
