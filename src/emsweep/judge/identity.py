"""What identifies a judge, for the judge nodes' keys, the judgment cache and the tables: its id
(judge_id: the model, and its endpoint over HTTP) and what it is made of (judge_build: a local
judge's weights, dtype and engine; a trained judge's artefact). Each kind answers for itself
(judge/kinds.py)."""

from __future__ import annotations

from emsweep.judge.kinds import kind_of
from emsweep.spec import SweepSpec


def judge_id(spec: SweepSpec) -> str:
    return kind_of(spec.judge).judge_id(spec)


def judge_build(spec: SweepSpec) -> str | None:
    """None for an API judge, whose model id and endpoint are all there is to know. Keys both the
    judge nodes and the judgment cache: replacing the weights at a path, or another dtype, re-judges."""
    return kind_of(spec.judge).judge_build(spec)
