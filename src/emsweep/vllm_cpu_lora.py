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
(all tokens on one adapter: a plain matmul; mixed: one batched matmul over the adapters present,
see lora_delta); tokens without an adapter get a zero delta, and a step with no adapter tokens
adds nothing at all. Shapes, scaling, padding rules and add/overwrite follow vLLM's ops, checked
against them in tests/test_vllm_cpu_lora.py. Measured on 2 cores (135M model): decoding 32
sequences with one adapter went from 55 to 103 tok/s, 4 adapters x 32 sequences from 73 to
142-152 tok/s (the base model on the same engine: 127 and 173-189 tok/s).

vLLM loads `vllm.general_plugins` entry points (pyproject.toml) in every process that runs a
model, including the spawned engine core, so every CPU engine in an environment with emsweep
installed uses these ops, benchmarks' raw baselines included. GPUs are left alone. Set
EMSWEEP_VLLM_CPU_LORA=vllm to keep vLLM's own ops (to compare them).
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SlotGroups:
    """Tokens of a step grouped by adapter slot, padded to one length so a batched matmul serves
    them all: row k of `gather` lists the tokens of slots[k] (padded with token 0, whose extra
    rows are computed and dropped), and `position` says where each token's row lands in the
    flattened [len(slots) * per_slot] result."""

    slots: torch.Tensor  # [S] the adapter slots present, ascending
    first_slots: bool  # slots == 0..S-1, so the stacked weights need no gather
    gather: torch.Tensor  # [S * per_slot] token index of each padded row
    position: torch.Tensor  # [tokens] row of each token in the padded result
    no_adapter: torch.Tensor  # tokens marked -1, whose delta must be zero
    per_slot: int


@functools.lru_cache(maxsize=16)
def slot_groups(indices: tuple[int, ...]) -> int | SlotGroups | None:
    """How tokens map to adapter slots: None when no token has an adapter, the slot when all share
    one, else a SlotGroups.

    Every LoRA layer of a forward pass sees the same indices, so this runs once per step (keyed by
    content, so a reused index buffer never serves a stale mapping)."""
    present = set(indices)
    if len(present) == 1:
        slot = present.pop()
        return None if slot < 0 else slot
    tensor = torch.tensor(indices)
    slots = sorted(s for s in present if s >= 0)
    members = [(tensor == slot).nonzero().squeeze(1) for slot in slots]
    per_slot = max(len(m) for m in members)
    gather = torch.zeros(len(slots), per_slot, dtype=torch.long)
    position = torch.zeros(len(indices), dtype=torch.long)
    for k, rows in enumerate(members):
        gather[k, : len(rows)] = rows
        position[rows] = k * per_slot + torch.arange(len(rows))
    return SlotGroups(slots=torch.tensor(slots), first_slots=slots == list(range(len(slots))),
                      gather=gather.reshape(-1), position=position,
                      no_adapter=(tensor < 0).nonzero().squeeze(1), per_slot=per_slot)


@functools.lru_cache(maxsize=16)
def sequence_slot_groups(seq_slots: tuple[int, ...], seq_lens: tuple[int, ...]):
    """slot_groups for one adapter index per sequence of seq_lens tokens (vLLM's prefill metadata)."""
    return slot_groups(tuple(itertools.chain.from_iterable(itertools.repeat(s, n) for s, n in zip(seq_slots, seq_lens))))


def lora_delta(inputs: torch.Tensor, weights: torch.Tensor, groups, dtype: torch.dtype) -> torch.Tensor:
    """Row t: inputs[t] @ weights[slot of t].T, zeros for tokens without an adapter.

    weights: [slots, out, in] or [slots, 1, out, in], as vLLM stacks adapters. A mixed batch is one
    batched matmul over [slots present, tokens per slot, in]: each token meets its own adapter
    only, so with similar token counts per adapter the cost is about one dense matmul whatever the
    number of adapters (at worst `slots` times that, when one adapter holds nearly all tokens).
    Measured per op at about 100 tokens: 1.1-3.3x one dense matmul; the earlier block matmul,
    which multiplied every token by every adapter, took 2.3-4.6x longer with 4 adapters and 4-17x
    with 16."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    if groups is None:
        return inputs.new_zeros(inputs.shape[0], weights.shape[1])
    if isinstance(groups, int):
        return inputs @ weights[groups].to(dtype).T
    count = len(groups.slots)
    present = weights[:count] if groups.first_slots else weights.index_select(0, groups.slots)
    padded = inputs.index_select(0, groups.gather).view(count, groups.per_slot, inputs.shape[1])
    outputs = torch.bmm(padded, present.to(dtype).transpose(1, 2)).view(count * groups.per_slot, -1)
    outputs = outputs.index_select(0, groups.position)
    if len(groups.no_adapter):
        outputs.index_fill_(0, groups.no_adapter, 0.0)
    return outputs


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
