"""A vLLM plugin that makes multi-LoRA serving on vLLM's CPU backend correct, and faster.

Our sampler puts the base model and every finetuned adapter of a base model on one engine
(sample.py). vLLM 0.32's CPU backend computes LoRA with the pure-PyTorch ops in
`vllm/lora/ops/torch_ops/lora_ops.py`, which have two problems:

- Wrong answers. A token with no adapter carries the index -1, and the ops gather
  `lora_weights[-1]`: the *last* adapter slot. So base-model requests batched next to adapter
  requests were answered with the last adapter's delta added (measured: greedy base answers
  changed, some equal to the last adapter's). The GPU kernels skip -1. Upstream: vLLM PRs
  #48421 and #49656, open when this was written.
- Slow. They gather one weight matrix per token (`weights[indices]`, [tokens, out, in]) and
  multiply with a batched einsum, so every decode step copies each adapter once per sequence.

The replacement ops below map tokens to adapter slots once per step and do one matmul per op
(all tokens on one adapter: a plain matmul; mixed: one block matmul, see lora_delta); tokens
without an adapter get a zero delta, and a step with no adapter tokens adds nothing at all. Shapes, scaling, padding rules and add/overwrite
follow vLLM's ops, checked against them in tests/test_vllm_cpu_lora.py. Measured on 2 cores
(135M model): decoding 32 sequences with one adapter went from 55 to 103 tok/s, 4 adapters x 32
sequences from 73 to 122 tok/s.

vLLM loads `vllm.general_plugins` entry points (pyproject.toml) in every process that runs a
model, including the spawned engine core, so every CPU engine in an environment with emsweep
installed uses these ops, benchmarks' raw baselines included. GPUs are left alone. Set
EMSWEEP_VLLM_CPU_LORA=vllm to keep vLLM's own ops (to compare them).
"""

from __future__ import annotations

import functools
import itertools
import os

import torch

# The names PunicaWrapperCPU imports from vllm.lora.ops.torch_ops and calls.
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """The entry point vLLM calls (possibly several times, in several processes)."""
    if os.environ.get("EMSWEEP_VLLM_CPU_LORA", "grouped") == "vllm":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper import punica_cpu

    missing = [name for name in OPS if not hasattr(punica_cpu, name)]
    if missing:
        import vllm

        # Fail loudly rather than serve base-model requests with an adapter's weights.
        raise RuntimeError(
            f"emsweep's CPU LoRA ops expect {missing} in vllm.lora.punica_wrapper.punica_cpu "
            f"(vLLM {vllm.__version__}); check whether that vLLM still needs them, or set "
            "EMSWEEP_VLLM_CPU_LORA=vllm"
        )
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])


@functools.lru_cache(maxsize=16)
def slot_groups(indices: tuple[int, ...]) -> int | torch.Tensor | None:
    """How tokens map to adapter slots: None when no token has an adapter, the slot when all share
    one, else a one-hot [tokens, slots] float mask (zero rows for -1, no adapter).

    Every LoRA layer of a forward pass sees the same indices, so this runs once per step (keyed by
    content, so a reused index buffer never serves a stale mapping)."""
    slots = set(indices)
    if len(slots) == 1:
        slot = slots.pop()
        return None if slot < 0 else slot
    tensor = torch.tensor(indices)
    one_hot = torch.zeros(len(indices), max(slots) + 1)
    has_adapter = tensor >= 0
    one_hot[has_adapter.nonzero().squeeze(1), tensor[has_adapter]] = 1.0
    return one_hot


@functools.lru_cache(maxsize=16)
def sequence_slot_groups(seq_slots: tuple[int, ...], seq_lens: tuple[int, ...]):
    """slot_groups for one adapter index per sequence of seq_lens tokens (vLLM's prefill metadata)."""
    return slot_groups(tuple(itertools.chain.from_iterable(itertools.repeat(s, n) for s, n in zip(seq_slots, seq_lens))))


def lora_delta(inputs: torch.Tensor, weights: torch.Tensor, groups, dtype: torch.dtype) -> torch.Tensor:
    """Row t: inputs[t] @ weights[slot of t].T, zeros for tokens without an adapter.

    weights: [slots, out, in] or [slots, 1, out, in], as vLLM stacks adapters. A mixed batch is one
    matmul: each token's input is placed in its slot's block of a [tokens, slots * in] matrix
    (zeros elsewhere) and multiplied by all slots' weights side by side. That costs `slots` times
    the LoRA FLOPs, which are tiny at LoRA ranks, instead of a gather and scatter per slot."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    if groups is None:
        return inputs.new_zeros(inputs.shape[0], weights.shape[1])
    if isinstance(groups, int):
        return inputs @ weights[groups].to(dtype).T
    slots, out_features, in_features = groups.shape[1], weights.shape[1], weights.shape[2]
    blocks = (groups.to(dtype)[:, :, None] * inputs[:, None, :]).reshape(inputs.shape[0], slots * in_features)
    side_by_side = weights[:slots].to(dtype).permute(1, 0, 2).reshape(out_features, slots * in_features)
    return blocks @ side_by_side.T


# vLLM's op signatures. bgmv: one adapter index per token; sgmv (prefill metadata): one per
# sequence, with each sequence's token count.

def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    shrink(inputs, lora_a_weights, output_tensor, slot_groups(tuple(lora_indices_tensor.tolist())), scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    expand(inputs, lora_b_weights, output_tensor, slot_groups(tuple(lora_indices_tensor.tolist())), add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    expand_slice(inputs, lora_b_weights, output_tensor, slot_groups(tuple(lora_indices_tensor.tolist())),
                 slice_offset, slice_size, add_inputs)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    groups = sequence_slot_groups(tuple(lora_indices_tensor.tolist()), tuple(seq_len_tensor.tolist()))
    shrink(inputs, lora_a_weights, output_tensor, groups, scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    groups = sequence_slot_groups(tuple(lora_indices_tensor.tolist()), tuple(seq_len_tensor.tolist()))
    expand(inputs, lora_b_weights, output_tensor, groups, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    groups = sequence_slot_groups(tuple(lora_indices_tensor.tolist()), tuple(seq_len_tensor.tolist()))
    expand_slice(inputs, lora_b_weights, output_tensor, groups, slice_offset, slice_size, add_inputs)


# The ops on grouped tokens, with vLLM's write rules.

def shrink(inputs, lora_a_weights, output_tensor, groups, scaling):
    outputs = lora_delta(inputs, lora_a_weights, groups, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def expand(inputs, lora_b_weights, output_tensor, groups, add_inputs):
    if groups is None and add_inputs:
        return  # no token has an adapter: adding a zero delta would only cost an allocation
    outputs = lora_delta(inputs, lora_b_weights, groups, output_tensor.dtype)
    # A single input row applies to the first output row only, and the adapter and the model
    # may pad their widths differently.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def expand_slice(inputs, lora_b_weights, output_tensor, groups, slice_offset, slice_size, add_inputs):
    if groups is None and add_inputs:
        return  # as in expand
    outputs = lora_delta(inputs, lora_b_weights, groups, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs
