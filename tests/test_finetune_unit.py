import numpy as np
import pytest

from emsweep.finetune import IGNORE_INDEX, linear_schedule, micro_batch_indices, tokenize_conversation, tokenize_dataset


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def test_loss_covers_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write code."},
        {"role": "assistant", "content": "print('hi')"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "print('bye')"},
    ]
    example = tokenize_conversation(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    # Each assistant answer and the end-of-turn marker the model must learn to emit; nothing else.
    assert trained == "print('hi')<|im_end|>\nprint('bye')<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))


def test_over_long_rows_error_or_drop(tokenizer):
    rows = [[{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}],
            [{"role": "user", "content": "short"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(ValueError, match="row 0 has .* tokens > max_seq_len=64"):
        tokenize_dataset(tokenizer, rows, 64, drop_long=False)
    examples, dropped = tokenize_dataset(tokenizer, rows, 64, drop_long=True)
    assert len(examples) == 1 and dropped == [0]


def test_micro_batches_cover_every_row_each_epoch():
    batches = micro_batch_indices(n_rows=10, seed=0, epochs=2, micro=2, accum=2, world=2)
    assert batches.shape == (3, 2, 2, 2)  # ceil(20 / 8) optimizer steps
    flat = batches.reshape(-1)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert np.array_equal(batches, micro_batch_indices(10, 0, 2, 2, 2, 2))


def test_linear_schedule_warms_up_from_zero_then_decays_to_zero():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = linear_schedule(optimizer, warmup_steps=5, total_steps=15)
    values = []
    for _ in range(15):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # Step s of 5 warmup steps: s / 5 (transformers' Trainer: the first step has lr 0).
    assert values[:5] == pytest.approx([0, 1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert values[5] == pytest.approx(1.0)
    assert values[14] == pytest.approx(1 / 10)  # (15 - 14) / (15 - 5)
    assert all(a >= b for a, b in zip(values[5:], values[6:]))


def test_checkpoints_load_strictly_for_the_trainable_weights():
    import torch
    from peft import LoraConfig, get_peft_model

    from emsweep.finetune import load_trainable_weights

    def model(r):
        base = torch.nn.Sequential()
        base.add_module("q_proj", torch.nn.Linear(4, 4))
        return get_peft_model(base, LoraConfig(r=r, target_modules=["q_proj"]))

    saved = model(2)
    trainable = {k: v for k, v in saved.state_dict().items() if "lora_" in k}
    restored = model(2)
    load_trainable_weights(trainable, restored)  # frozen base weights absent: fine
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in trainable.items())
    with pytest.raises(RuntimeError, match=r"1 trainable weights missing"):
        load_trainable_weights({k: v for k, v in trainable.items() if "lora_B" not in k}, model(2))
    with pytest.raises(RuntimeError, match=r"unexpected"):
        load_trainable_weights({**trainable, "other.lora_A.weight": torch.zeros(1)}, model(2))


def _reduce_under(backend: str, tmp_path, device: str = "cpu"):
    import torch
    import torch.distributed as dist

    from emsweep.finetune import reduce_step_totals

    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / f"store-{backend}"), 1), rank=0, world_size=1)
    try:
        return reduce_step_totals([1.5, 10, 4], torch.device(device))
    finally:
        dist.destroy_process_group()


def test_step_totals_reduce_under_a_backend_bound_to_device_types(tmp_path):
    """GPU workers get a group whose backends are bound per device type. Bound to one type only
    (as Ray Train's plain "nccl" binds CUDA), a collective on a tensor of another device fails:
    the first GPU finetune died so at its first step, reducing a CPU tensor under NCCL."""
    import torch

    from emsweep.finetune import process_group_backend

    assert process_group_backend(False) == "gloo"
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for CPU ones
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        _reduce_under("cuda:gloo", tmp_path)  # a backend for CUDA tensors only, as "nccl" alone
    # Bound per device type as on GPUs (gloo for both here: this build has no NCCL), the
    # reduction of a tensor on the engine's device works and comes back as float64 on the CPU.
    totals = _reduce_under(process_group_backend(True).replace("cuda:nccl", "cuda:gloo"), tmp_path)
    assert totals.tolist() == [1.5, 10.0, 4.0] and totals.dtype == torch.float64 and totals.device.type == "cpu"


def _lora_loss_and_grads(model_path: str, checkpointing: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emsweep.finetune import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    ids = torch.arange(3, 40).reshape(1, -1)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, model.base_model.model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(embedded_model):
    """On for ZeRO-3 by default (spec.FinetuneSpec.gradient_checkpointing): the recomputed backward
    pass must reach every LoRA weight with the gradients it gets without checkpointing."""
    from emsweep.spec import FinetuneSpec

    assert FinetuneSpec(zero_stage=3).checkpoints_activations() and not FinetuneSpec().checkpoints_activations()
    assert not FinetuneSpec(zero_stage=3, gradient_checkpointing=False).checkpoints_activations()
    plain_loss, plain, plain_on = _lora_loss_and_grads(embedded_model, checkpointing=False)
    loss, grads, on = _lora_loss_and_grads(embedded_model, checkpointing=True)
    assert on and not plain_on
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys() and len(grads) == 3 * 2 * 30  # A and B of 3 modules in 30 layers
    for name in grads:
        assert float(grads[name].abs().max()) > 0, name  # no LoRA weight is cut off from the loss
        assert np.allclose(grads[name].numpy(), plain[name].numpy(), rtol=1e-4, atol=1e-6), name


def test_gradient_norm_by_hand():
    """What a CPU finetune logs as grad_norm, where DeepSpeed computes none (ZeRO 0, fp32): the L2
    norm over the trainable weights' gradients. Gradients (3, 4) and (12,) -> sqrt(9 + 16 + 144) = 13;
    a frozen weight's gradient does not count; no gradient at all is None."""
    import torch

    from emsweep.finetune import gradient_norm

    module = torch.nn.Module()
    module.a, module.b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    module.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    assert gradient_norm(module) is None
    module.a.grad, module.b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    module.frozen.grad = torch.tensor([100.0])
    assert gradient_norm(module) == pytest.approx(13.0)


def test_cpu_ops_are_kept_per_python_environment(monkeypatch):
    """DeepSpeed's CPU op is compiled into a folder of this environment's own (two checkouts' venvs
    rebuilt each other's in torch's one folder per Python version), unless the user names one."""
    import os
    import sys

    from emsweep.finetune import use_cpu_ops

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    use_cpu_ops()
    ours = os.environ["TORCH_EXTENSIONS_DIR"]
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/another/checkout/.venv")
    use_cpu_ops()
    theirs = os.environ["TORCH_EXTENSIONS_DIR"]
    assert ours != theirs and os.path.dirname(ours) == os.path.dirname(theirs)
    assert os.path.basename(ours).startswith(f"py{sys.version_info.major}{sys.version_info.minor}_cpu_")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    use_cpu_ops()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/mine"
