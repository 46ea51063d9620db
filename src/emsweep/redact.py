"""Secrets never reach logs, tables or W&B: one function that strips them from any text.

Applied to every error message the CLI prints, to judgment `null_reason`s (HTTP error bodies
can echo a request's headers) and to failure records. It removes:
- the values of environment variables whose names look secret (`*KEY*`, `*TOKEN*`, `*SECRET*`,
  `*PASSWORD*`, `*CREDENTIAL*`), plus any value passed in `secrets` (a judge's API key);
- text shaped like a credential: `Bearer ...` / `Authorization: ...`, `sk-...` API keys, AWS
  access key ids, and URI query parameters or `name=value` pairs whose name looks secret.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

MASK = "***"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|SIGNATURE|AUTH", re.IGNORECASE)
# Values shorter than this are not masked by value (an env var "KEY=1" would mask every "1").
MIN_SECRET_LEN = 6
PATTERNS = [
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s\"',;}]+"),
    re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\b(sk-)[A-Za-z0-9_-]{8,}"),
    re.compile(r"\b()(?:AKIA|ASIA)[A-Z0-9]{12,}"),
    # name=value in a query string, a config dump or a message: access_key=..., api_key: ...
    re.compile(r"(?i)\b([a-z0-9_-]*(?:key|token|secret|passw(?:or)?d|signature|credential)[a-z0-9_-]*"
               r"[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;}]+"),
]


def _secret_values(extra: Iterable[str | None]) -> list[str]:
    values = [v for name, v in os.environ.items() if SECRET_NAME.search(name)]
    values += [v for v in extra if v]
    # Longest first, so a secret containing another is masked whole.
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str | None, secrets: Iterable[str | None] = ()) -> str | None:
    """`text` with every secret value and credential-shaped substring replaced by ***."""
    if not text:
        return text
    for value in _secret_values(secrets):
        text = text.replace(value, MASK)
    for pattern in PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK if m.lastindex else MASK, text)
    return text


def redact_uri(uri: str) -> str:
    """A URI without its query (which may carry credentials such as access_key/secret_key)."""
    return uri.split("?", 1)[0]
