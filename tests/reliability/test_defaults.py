"""Defaults that fit the machine: a CPU engine without `kv_cache_gib` sizes its KV cache from the
memory actually free, and CPU training workers reserve Ray's `memory` resource, so Ray runs only as
many finetunes at once as memory holds (never so many that the OOM killer picks them off)."""

import subprocess
import sys
import textwrap

import pytest

from emsweep import engine
from emsweep.engine import GIB, cpu_kv_cache_bytes, finetune_worker_memory_bytes, weights_bytes


@pytest.fixture()
def model_folder(tmp_path):
    with open(tmp_path / "model.safetensors", "wb") as f:  # 0.25 GiB of "weights", sparse on disk
        f.truncate(GIB // 4)
    return str(tmp_path)


def test_kv_cache_is_a_share_of_free_memory_within_bounds(model_folder):
    assert weights_bytes(model_folder) == GIB // 4 and weights_bytes("Qwen/Qwen2.5-7B") == 0
    # 20 GiB free, 0.5 GiB for twice the weights: a quarter of the rest.
    assert cpu_kv_cache_bytes(model_folder, available=20 * GIB) == int(0.25 * 19.5 * GIB)
    assert cpu_kv_cache_bytes(model_folder, available=1 * GIB) == GIB // 2  # floor: the engine must start
    assert cpu_kv_cache_bytes(model_folder, available=500 * GIB) == 8 * GIB  # a big server: capped


def test_a_cpu_engine_without_kv_cache_gib_takes_its_size_from_free_memory(model_folder, monkeypatch):
    monkeypatch.setattr(engine, "available_memory_bytes", lambda: 6 * GIB)
    args = engine.engine_args(model_folder, gpu_memory_utilization=0.5, max_model_len=1024)
    assert args["kv_cache_memory_bytes"] == int(0.25 * 5.5 * GIB)  # not half of all RAM
    explicit = engine.engine_args(model_folder, gpu_memory_utilization=0.5, max_model_len=1024, kv_cache_gib=2)
    assert explicit["kv_cache_memory_bytes"] == 2 * GIB
    # On this machine, now: positive and below what is free.
    assert GIB // 2 <= cpu_kv_cache_bytes(model_folder) <= max(GIB // 2, engine.available_memory_bytes())


def test_training_workers_reserve_memory_and_ray_serialises_what_does_not_fit(model_folder):
    """Real Ray with 13 GiB of `memory`: finetune workers of 3 GiB each (float32 weights twice, plus
    2 GiB; 2 per finetune): Ray runs at most two finetunes' workers at a time, never three."""
    per_worker = finetune_worker_memory_bytes(model_folder)
    assert per_worker == 4 * (GIB // 4) + 2 * GIB
    script = textwrap.dedent(f"""
        import time, ray
        from emsweep.finetune import scaling_config
        from emsweep.sweep.resources import finetune_memory_per_worker
        from emsweep.spec import FinetuneSpec

        ray.init(num_cpus=16, _memory=13 * 2**30, include_dashboard=False, logging_level="ERROR")
        per_worker = finetune_memory_per_worker({model_folder!r}, num_workers=2)
        config = scaling_config(FinetuneSpec(num_workers=2), use_gpu=False, memory_per_worker=per_worker)
        assert config._resources_per_worker_not_none == {{"CPU": 1, "memory": per_worker}}, config

        @ray.remote(num_cpus=1, memory=per_worker)
        def worker(index):
            start = time.time()
            time.sleep(6)
            return start, time.time()

        spans = ray.get([worker.remote(i) for i in range(6)])  # 3 finetunes' worth of workers
        most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
        print("most at once", most, "per worker", per_worker)
        # 4 x 3 GiB <= 13 GiB: never more than two finetunes' workers at once (on a loaded machine
        # worker start-up can stagger them, so fewer may overlap).
        assert 2 <= most <= 4, most
        ray.shutdown()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "most at once" in result.stdout


def test_a_worker_estimate_larger_than_a_node_is_capped_to_fit():
    script = textwrap.dedent("""
        import ray
        from unittest import mock
        from emsweep.sweep import resources

        ray.init(num_cpus=2, _memory=4 * 2**30, include_dashboard=False, logging_level="ERROR")
        with mock.patch("emsweep.engine.finetune_worker_memory_bytes", return_value=64 * 2**30):
            capped = resources.finetune_memory_per_worker("/any", num_workers=2)
        print("capped", capped)
        assert capped == 2 * 2**30, capped
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
