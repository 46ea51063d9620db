"""engine.engine_args: the vLLM settings and environment every emsweep engine starts with."""

import os


def test_a_gpu_engine_spawns_its_engine_core(monkeypatch):
    """On a GPU, engine_args has initialised CUDA (torch.cuda.is_available) before vLLM starts, and
    a sampling job is a Ray task, where vLLM forks by default: the forked engine core could not
    use CUDA. The environment makes vLLM spawn it instead; CPU engines are left as they were."""
    import torch

    from emsweep.engine import engine_args

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = engine_args("model", gpu_memory_utilization=0.9, max_model_len=256, kv_cache_gib=1)
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ and cpu["enforce_eager"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = engine_args("model", gpu_memory_utilization=0.9, max_model_len=256, kv_cache_gib=1)
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert "enforce_eager" not in gpu and gpu["kv_cache_memory_bytes"] == 1 << 30
