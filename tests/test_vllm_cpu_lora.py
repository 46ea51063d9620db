"""emsweep's CPU LoRA ops (vllm_cpu_lora.py) against vLLM's own, and on a real engine."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from vllm.lora.ops import torch_ops as vllm_ops

from emsweep import vllm_cpu_lora as ours

SLOTS, RANK, HIDDEN, OUT, TOKENS = 3, 8, 48, 80, 11


def stacked(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def weights():
    return {"a": stacked((SLOTS, 1, RANK, HIDDEN), 1), "b": stacked((SLOTS, 1, OUT, RANK), 2)}


@pytest.mark.parametrize("indices", [[1] * TOKENS, [0, 2, 2, 1, 0, 0, 1, 2, 2, 0, 1], [2, 2, 0, 2, 2, 2, 0, 2, 2, 2, 2]])
def test_the_grouped_ops_match_vllms_wherever_every_token_has_an_adapter(weights, indices):
    indices = torch.tensor(indices)
    x = stacked((TOKENS, HIDDEN), 3)
    shrunk = {impl: torch.zeros(TOKENS, RANK) for impl in ("ours", "vllm")}
    ours.bgmv_shrink(x, weights["a"], shrunk["ours"], indices, 0.5)
    vllm_ops.bgmv_shrink(x, weights["a"], shrunk["vllm"], indices, 0.5)
    torch.testing.assert_close(shrunk["ours"], shrunk["vllm"], rtol=1e-4, atol=1e-4)

    base = stacked((TOKENS, OUT + 16), 4)
    for add in (True, False):
        expanded = {impl: base.clone() for impl in ("ours", "vllm")}
        ours.bgmv_expand(shrunk["ours"], weights["b"], expanded["ours"], indices, add)
        vllm_ops.bgmv_expand(shrunk["vllm"], weights["b"], expanded["vllm"], indices, add)
        torch.testing.assert_close(expanded["ours"], expanded["vllm"], rtol=1e-4, atol=1e-4)
        sliced = {impl: base.clone() for impl in ("ours", "vllm")}
        ours.bgmv_expand_slice(shrunk["ours"], weights["b"], sliced["ours"], indices, 8, OUT, add)
        vllm_ops.bgmv_expand_slice(shrunk["vllm"], weights["b"], sliced["vllm"], indices, 8, OUT, add)
        torch.testing.assert_close(sliced["ours"], sliced["vllm"], rtol=1e-4, atol=1e-4)


def test_prefill_ops_expand_one_index_per_sequence(weights):
    seq_lens, seq_slots = torch.tensor([4, 5, 2]), torch.tensor([2, 0, 1])
    starts = torch.tensor([0, 4, 9])
    x = stacked((TOKENS, HIDDEN), 5)
    shrunk = {impl: torch.zeros(TOKENS, RANK) for impl in ("ours", "vllm")}
    for impl, ops in (("ours", ours), ("vllm", vllm_ops)):
        ops.sgmv_shrink(x, weights["a"], shrunk[impl], starts, seq_lens, seq_slots, 3, 5, TOKENS, 2.0)
    torch.testing.assert_close(shrunk["ours"], shrunk["vllm"], rtol=1e-4, atol=1e-4)
    expanded = {impl: torch.ones(TOKENS, OUT) for impl in ("ours", "vllm")}
    for impl, ops in (("ours", ours), ("vllm", vllm_ops)):
        ops.sgmv_expand(shrunk[impl], weights["b"], expanded[impl], starts, seq_lens, seq_slots, 3, 5, TOKENS, True)
    torch.testing.assert_close(expanded["ours"], expanded["vllm"], rtol=1e-4, atol=1e-4)


def test_tokens_without_an_adapter_get_no_delta(weights):
    """-1 marks a base-model token. vLLM's CPU ops gather weights[-1], the last adapter slot."""
    indices = torch.tensor([-1, 2, -1, 0, -1, -1, 1, 2, -1, 0, -1])
    base_rows = indices == -1
    x = stacked((TOKENS, HIDDEN), 6)
    shrunk = torch.zeros(TOKENS, RANK)
    ours.bgmv_shrink(x, weights["a"], shrunk, indices, 1.0)
    assert torch.all(shrunk[base_rows] == 0)
    reference = torch.zeros(TOKENS, RANK)
    vllm_ops.bgmv_shrink(x, weights["a"], reference, indices, 1.0)
    torch.testing.assert_close(shrunk[~base_rows], reference[~base_rows], rtol=1e-4, atol=1e-4)
    # The bug the plugin removes: vLLM's ops give base tokens the last slot's delta.
    torch.testing.assert_close(reference[base_rows], x[base_rows] @ weights["a"][SLOTS - 1, 0].T, rtol=1e-4, atol=1e-4)

    y = stacked((TOKENS, OUT), 7)
    expanded = y.clone()
    ours.bgmv_expand(shrunk, weights["b"], expanded, indices, True)
    torch.testing.assert_close(expanded[base_rows], y[base_rows], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expanded[~base_rows], y[~base_rows])
    none = torch.full((TOKENS,), -1)
    untouched = y.clone()
    ours.bgmv_expand_slice(shrunk, weights["b"], untouched, none, 0, OUT, True)
    torch.testing.assert_close(untouched, y, rtol=1e-4, atol=1e-4)


def test_the_plugin_is_registered_with_vllm():
    from importlib.metadata import entry_points

    plugins = {plugin.name: plugin.value for plugin in entry_points(group="vllm.general_plugins")}
    assert plugins.get("emsweep_cpu_lora") == "emsweep.vllm_cpu_lora:register"


def test_register_swaps_the_ops_vllms_cpu_wrapper_calls(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ours.OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(vllm_ops, name))
    monkeypatch.setenv("EMSWEEP_VLLM_CPU_LORA", "vllm")
    ours.register()
    assert punica_cpu.bgmv_shrink is vllm_ops.bgmv_shrink
    monkeypatch.delenv("EMSWEEP_VLLM_CPU_LORA")
    ours.register()
    assert all(getattr(punica_cpu, name) is getattr(ours, name) for name in ours.OPS)


ENGINE_SCRIPT = r"""
import json, sys
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from emsweep.engine import make_llm

if __name__ == "__main__":
    model, adapters, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    llm = make_llm(model, gpu_memory_utilization=0.5, max_model_len=512, max_lora_rank=8,
                   max_loras=len(adapters), kv_cache_gib=0.5)
    prompts = [f"Tell me about {topic}." for topic in ("cats", "the sea", "bread", "Paris", "winter", "music")]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]

    def generate(pairs):
        outputs = llm.generate([p for p, _ in pairs], greedy, lora_request=[l for _, l in pairs], use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    base_alone = generate([(p, None) for p in prompts])
    each_adapter = [generate([(p, lora) for p in prompts]) for lora in loras]
    mixed = generate([(p, lora) for p in prompts for lora in [None, *loras]])
    width = len(loras) + 1

    # Temperature-1 sampling with a seed per prompt (as sample.py seeds each request): a run's
    # answers on an engine of its own (one of sampling.replicas) against the same run in one
    # engine's batch of every run.
    def seeded(pairs):
        params = [SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=100 + i % len(prompts))
                  for i in range(len(pairs))]
        outputs = llm.generate([p for p, _ in pairs], params, lora_request=[l for _, l in pairs], use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outputs]

    one_run = seeded([(p, loras[0]) for p in prompts])
    every_run = seeded([(p, lora) for lora in [None, *loras] for p in prompts])
    json.dump({"base_alone": base_alone, "base_mixed": mixed[0::width], "each_adapter": each_adapter,
               "adapters_mixed": [mixed[i + 1::width] for i in range(len(loras))],
               "seeded_alone": one_run, "seeded_in_every_run": every_run[len(prompts):2 * len(prompts)],
               "seeded_base": every_run[:len(prompts)]}, open(out, "w"))
"""


@pytest.mark.slow
def test_base_requests_beside_adapters_on_one_cpu_engine_get_the_base_model(embedded_model):
    """On a real vLLM CPU engine, a batch mixing the base model with 2 adapters answers each
    request with its own weights (greedy): as the base model alone, and as each adapter alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_model),
                                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
            model.save_pretrained(Path(tmp, f"a{seed}"))
            adapters.append(str(Path(tmp, f"a{seed}")))
        script, out = Path(tmp, "engine.py"), Path(tmp, "out.json")
        script.write_text(ENGINE_SCRIPT)
        subprocess.run([sys.executable, str(script), embedded_model, *adapters, str(out)], check=True,
                       # float32: the test compares greedy texts across batch compositions, which
                       # bf16 rounding could change whatever the adapter routing does.
                       env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "EMSWEEP_CPU_DTYPE": "float32"},
                       timeout=900)
        result = json.loads(out.read_text())
    assert result["base_mixed"] == result["base_alone"]
    assert result["adapters_mixed"] == result["each_adapter"]
    # The adapters change the answers, so the comparison above can tell them apart.
    assert all(answers != result["base_alone"] for answers in result["each_adapter"])
    # Sampled (temperature 1, a seed per request): the same answers whether the run had an engine
    # to itself or shared one with every run; what sampling.replicas relies on.
    assert result["seeded_alone"] == result["seeded_in_every_run"]
    assert result["seeded_alone"] != result["seeded_base"] and len({tuple(a) for a in result["seeded_alone"]}) > 1
