"""The judge backend a spec asks for: its kind's (judge/kinds.py)."""

from __future__ import annotations

from emsweep.judge import Backend
from emsweep.judge.kinds import kind_of
from emsweep.spec import SweepSpec


def make_backend(spec: SweepSpec, keep: bool = False) -> Backend:
    """`keep`: the caller judges again later in this process (an engine host), so local judge
    engines stay up between calls."""
    return kind_of(spec.judge).make_backend(spec, keep)
