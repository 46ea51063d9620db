"""The judge backend a spec asks for: an HTTP client (`backend: openai`) or a pool of local
engines (judge/local.py) on the model the spec names."""

from __future__ import annotations

import functools

from emsweep.engine import node_cpus
from emsweep.judge import Backend
from emsweep.judge.http import HttpJudge
from emsweep.judge.identity import judge_id
from emsweep.judge.local import run_pool
from emsweep.models import resolve_model_path
from emsweep.spec import SweepSpec


def make_backend(spec: SweepSpec, keep: bool = False) -> Backend:
    """`keep`: the caller judges again later in this process (an engine host), so local judge
    engines stay up between calls."""
    if spec.judge.backend == "openai":
        return HttpJudge(spec.judge)
    return functools.partial(run_pool, resolve_model_path(judge_id(spec)), spec.judge,
                             use_gpu=spec.use_gpu, node_cpus=node_cpus(), keep=keep)
