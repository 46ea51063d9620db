"""What identifies a judge, for the judge nodes' keys, the judgment cache and the tables: its id
(judge_id: the model, and its endpoint over HTTP) and, for a local judge, what it is made of
(judge_build: the weights' content, the dtype and the engine)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from emsweep.engine import cpu_dtype
from emsweep.judge.local import judge_class
from emsweep.keys import model_fingerprint
from emsweep.spec import JudgeSpec, SweepSpec


def judge_id(spec: SweepSpec) -> str:
    """What identifies the judge: the served model id and its endpoint over HTTP (two providers
    serving one model id are two judges), the model path locally."""
    if spec.judge.backend == "openai":
        endpoint = _endpoint(spec.judge.base_url)
        # OpenAI's own endpoint is left out, as before endpoints were keyed: its judgments stay valid.
        if endpoint == _endpoint(JudgeSpec.model_fields["base_url"].default):
            return f"openai:{spec.judge.model}"
        return f"openai:{endpoint}:{spec.judge.model}"
    names = {m.name: m.path for m in spec.models}
    return names.get(spec.judge.model, spec.judge.model)


def _endpoint(url: str) -> str:
    """scheme://host[:port]/path of a URL: no credentials or query (the id reaches tables)."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"



def judge_build(spec: SweepSpec) -> str | None:
    """What a local judge is made of besides its name: its weights' content, the dtype and the
    engine that computes its scores (the judging page measures that dtype changes scores). None
    for an API judge, whose model id and endpoint are all there is to know. Keys both the judge
    nodes and the judgment cache: replacing the weights at a path, or another dtype, re-judges."""
    if spec.judge.backend != "vllm":
        return None
    reference = judge_id(spec)
    engine = judge_class(spec.judge, spec.use_gpu).__name__
    # On GPUs the engines load the checkpoint's own dtype; on CPUs, cpu_dtype() (EMSWEEP_CPU_DTYPE).
    dtype = "checkpoint" if spec.use_gpu else cpu_dtype()
    return json.dumps({"weights": model_fingerprint(reference), "engine": engine, "dtype": dtype}, sort_keys=True)

