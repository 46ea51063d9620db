"""What node keys hash besides the spec: the content of the files a node reads, and the judge's identity.

`sweep.plan.plan` keys every node by its config slice and these (store.config_key); `checks`
recomputes a data node's key to skip re-validating a dataset already built from the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from emsweep.data import sha256_file
from emsweep.judged_files import reference_files
from emsweep.spec import JudgeSpec, SweepSpec
from emsweep.store import config_key


def fingerprint(location: str) -> str:
    """Content hash of a local source, so editing the file re-runs what read it."""
    path = Path(location.removeprefix("file://"))
    if "://" in location and not location.startswith("file://"):
        return location  # URLs are pinned by the spec's sha256 when it matters
    if path.is_dir():
        return ",".join(f"{p.name}:{sha256_file(p)}" for p in sorted(path.glob("*.jsonl")))
    return sha256_file(path) if path.exists() else "missing"


def reference_fingerprint(location: str) -> str:
    """Content hash of judged-answer files (a judge panel's, a judged dataset's)."""
    if not Path(location).exists():
        return "missing"
    return ",".join(f"{p.name}:{fingerprint(str(p))}" for p in reference_files(location, location))


def data_config(dataset) -> dict:
    content = reference_fingerprint(dataset.path) if dataset.judged is not None else fingerprint(dataset.path)
    config = {"dataset": dataset.key_config(), "content": content}
    if dataset.backdoor is not None:  # its clean rows are read too: editing them rebuilds the mix
        config["clean_content"] = fingerprint(dataset.backdoor.clean_path)
    return config


def data_node_key(dataset) -> str:
    """The key plan() gives a dataset's data node."""
    return config_key("data", data_config(dataset), [])


def judge_model_ref(spec: SweepSpec) -> str:
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
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def model_fingerprint(reference: str) -> str | None:
    """Content hash of a local model folder (every file: weights, config, tokenizer), each file
    hashed once per version (its size and mtime, as datasets are); None for a hub id, or an
    embedded model not fetched yet (nothing local to hash)."""
    from emsweep.models import resolve_model_path

    try:
        folder = Path(resolve_model_path(reference))
    except (FileNotFoundError, ValueError):
        return None
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return ",".join(f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files)


def judge_build(spec: SweepSpec) -> str | None:
    """What a local judge is made of besides its name: its weights' content, the dtype and the
    engine that computes its scores (the judging page measures that dtype changes scores). None
    for an API judge, whose model id and endpoint are all there is to know. Keys both the judge
    nodes and the judgment cache: replacing the weights at a path, or another dtype, re-judges."""
    if spec.judge.backend != "vllm":
        return None
    from emsweep.engine import cpu_dtype
    from emsweep.judge.local import judge_class

    reference = judge_model_ref(spec)
    engine = judge_class(spec.judge, spec.use_gpu).__name__
    # On GPUs the engines load the checkpoint's own dtype; on CPUs, cpu_dtype() (EMSWEEP_CPU_DTYPE).
    dtype = "checkpoint" if spec.use_gpu else cpu_dtype()
    return json.dumps({"weights": model_fingerprint(reference), "engine": engine, "dtype": dtype}, sort_keys=True)

