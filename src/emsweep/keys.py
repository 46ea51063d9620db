"""What node keys hash besides the spec: the content of the files a node reads (data, questions,
model folders). The judge's identity is judge/identity.py's.

`sweep.plan.plan` keys every node by its config slice and these (store.config_key); `checks`
recomputes a data node's key to skip re-validating a dataset already built from the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from emsweep.data import sha256_file
from emsweep.judged_files import reference_files
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
