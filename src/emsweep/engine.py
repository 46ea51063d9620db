"""Starting a vLLM engine, shared by the sample and judge stages.

Where vLLM spawns its engine-core process (GPUs, CPU machines with more than 4 cores), code
that calls `make_llm` from a script needs the `if __name__ == "__main__":` guard; inside Ray
workers that is already the case.
"""

from __future__ import annotations

import hashlib
import math
import os


def fit_small_cpu_machine() -> None:
    """On small CPU machines, give vLLM's compute every core and skip its engine-core process.

    - vLLM's CPU backend keeps one core per worker free for its scheduler process. On a 2-core
      laptop that halves the compute: decoding 8 prompts x 16 samples x 64 tokens measured
      180-190 tok/s with the core reserved against 294-305 tok/s without (135M model, 2 cores).
    - vLLM runs its engine core in a spawned process, which imports torch and vLLM again and then
      competes with the caller for the same 2 cores. In-process (vLLM's InprocClient) an engine
      started in 12 s instead of 46-50 s, and decoded 137 tok/s instead of 105-113 (32 samples,
      2 cores). emsweep runs every engine job in its own Ray worker (max_calls=1), so the
      engine's memory still goes when the job ends.
    Larger machines keep vLLM's defaults, and a value the user set always wins."""
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cpu_dtype() -> str:
    """The dtype of models run on this machine's CPUs: bfloat16 where the CPU computes it natively.

    Measured on a 2-core AMD EPYC with AVX512-BF16, Qwen2.5-Coder-1.5B: vLLM prefill 221 tok/s in
    bfloat16 against 108 in float32; a transformers forward 3.6 s against 8.0 s. CPUs without
    native bf16 (no AVX512-BF16 / AMX) emulate it and run float32 about 2.5x faster.
    `EMSWEEP_CPU_DTYPE` (float32 / bfloat16) overrides the choice, e.g. for exactness tests."""
    chosen = os.environ.get("EMSWEEP_CPU_DTYPE")
    if chosen:
        return chosen
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


GIB = 2**30
# CPU KV cache without `kv_cache_gib`: this share of the memory free when the engine starts, after
# twice the weights (weights + working memory), within these bounds.
KV_SHARE_OF_FREE, KV_MIN_BYTES, KV_MAX_BYTES = 0.25, GIB // 2, 8 * GIB


def weights_bytes(model_path: str) -> int:
    """Bytes of a local model folder's weights (0 for a hub id: not known before loading)."""
    from pathlib import Path

    folder = Path(model_path)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def available_memory_bytes() -> int:
    """Memory free for new allocations now (page cache counts as free), as the kernel reports it."""
    import psutil

    return int(psutil.virtual_memory().available)


def cpu_kv_cache_bytes(model_path: str, available: int | None = None) -> int:
    """A CPU engine's KV cache when the spec sets no `kv_cache_gib`.

    vLLM's CPU default reserves a fixed share of all RAM (half, at gpu_memory_utilization 0.5)
    whatever else runs: two engines, or an engine beside finetunes, then push the machine into the
    OOM killer. Sized from what is actually free instead; a 135M-1.5B model needs far less
    (a 4096-token Qwen2.5-1.5B sequence holds 0.1 GiB of bf16 KV)."""
    free = available_memory_bytes() if available is None else available
    budget = max(0, free - 2 * weights_bytes(model_path))
    return int(min(KV_MAX_BYTES, max(KV_MIN_BYTES, KV_SHARE_OF_FREE * budget)))


def finetune_worker_memory_bytes(model_path: str) -> int:
    """Memory one CPU training worker asks Ray for, so that Ray's `memory` resource bounds how many
    finetunes run at once. Measured-order estimate: float32 weights twice (the model and
    DeepSpeed's copy) plus 2 GiB for activations at our sequence lengths, torch and Ray."""
    return 2 * 2 * weights_bytes(model_path) + 2 * GIB  # bf16 on disk -> float32 in memory


def make_llm(model_path: str, **settings):
    """A vLLM engine with our settings (`engine_args`)."""
    from vllm import LLM

    return LLM(**engine_args(model_path, **settings))


def engine_args(
    model_path: str,
    *,
    gpu_memory_utilization: float,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    max_lora_rank: int | None = None,
    max_loras: int = 1,
    kv_cache_gib: float | None = None,
) -> dict:
    """The `vllm.LLM` arguments of every emsweep engine (and the environment they need), in one
    place so the benchmarks' raw baselines start the same engine."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    lora = {}
    if max_lora_rank is not None:
        # vLLM only accepts these ranks; round up to the next one that holds ours.
        rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max_lora_rank)
        lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": max_loras}
    platform = {}
    import torch

    if torch.cuda.is_available():
        # The check above has initialised CUDA in this process, and vLLM forks its engine core by
        # default outside an actor (a sampling job is a Ray task): a forked child cannot use CUDA
        # ("Cannot re-initialize CUDA in forked subprocess"). Spawned, it starts clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    else:
        fit_small_cpu_machine()
        platform = {
            # vLLM's CPU runner crashes ("CPU Generator does not use offset") when a request with
            # its own seed is prefilled in chunks; whole-prompt prefill avoids that code path.
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, 8192),
            "dtype": cpu_dtype(),
            # Prefix caching reuses whole blocks only: each single-token step of the exact
            # judge scores (scoring.py) recomputes up to one block of the cached prompt, so the
            # smallest block the CPU backend supports (32; its default is 128) makes them cheaper.
            "block_size": 32,
            # vLLM compiles the model with Inductor at every engine start on CPU (its compile cache
            # fails to load here): measured 186-306 s per start against 49 s eager, on 2 cores.
            # Eager decoded about 2x slower in that measurement, but our CPU engines are
            # short-lived (one stage each) and LoRA engines run eager anyway.
            "enforce_eager": True,
        }
    if kv_cache_gib is not None:
        # An explicit KV cache size; otherwise vLLM reserves gpu_memory_utilization of the
        # device (of all RAM on CPU), which a laptop running finetunes beside it may not have.
        platform["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
    elif not torch.cuda.is_available():
        platform["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model_path)
    return dict(
        model=model_path,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        seed=seed,
        # Many requests share long prefixes (judge templates, system prompts).
        enable_prefix_caching=True,
        **lora,
        **platform,
    )


def first_token_probs(output) -> dict[str, float]:
    """token text -> probability of the first generated token, from a vLLM output with logprobs."""
    probs: dict[str, float] = {}
    for entry in output.outputs[0].logprobs[0].values():
        token = entry.decoded_token or ""
        probs[token] = probs.get(token, 0.0) + math.exp(entry.logprob)
    return probs


def render_chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stable_seed(*parts: object) -> int:
    """A per-request sampling seed that does not depend on batch order or process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def node_cpus() -> int:
    """CPUs of one node of the connected Ray cluster, assuming the head node is typical."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1) // max(1, len(ray.nodes())))
