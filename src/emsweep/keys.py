"""What node keys hash besides the spec: the content of the files a node reads (data, questions,
model folders), never where they sit. The judge's identity is judge/identity.py's.

Key schema 2 (KEY_SCHEMA): a key depends on what its inputs contain, so moving a checkout, the
data or the output dir, or running from another working directory, moves no key. Schema 1 hashed
the absolute paths of local inputs beside their content; `emsweep migrate` carries an output dir
written then across (sweep/migrate.py), planning it once more with `plan(spec, key_schema=1)`.

`sweep.plan.plan` keys every node by its config slice and these (store.config_key); `checks`
recomputes a data node's key to skip re-validating a dataset already built from the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from emsweep.data import sha256_file
from emsweep.judged_files import reference_files
from emsweep.store import config_key


KEY_SCHEMA = 2


def is_local(reference: str) -> bool:
    """A resolved local path (the spec makes every local path absolute), not a hub id, URI or
    `embedded:` name, which name the same thing wherever the sweep runs."""
    return "://" not in reference and not reference.startswith("embedded:") and Path(reference).is_absolute()


def model_identity(reference: str) -> str:
    """What a key holds of a model: a local folder by its content (every file; each file's hash is
    kept per (path, size, mtime), so a folder is read once per version), anything else as
    written (an embedded model is pinned by its package's sha256, a hub id by its name)."""
    if not is_local(reference):
        return reference
    content = model_fingerprint(reference)
    return "missing" if content is None else "sha256:" + hashlib.sha256(content.encode()).hexdigest()


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
