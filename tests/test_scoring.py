"""Exact 0-100 judge scores: the trie walk over vLLM equals brute force with transformers."""

import functools
import math

import pytest
import torch

from emsweep.scoring import digit_tokens, expected_value, number_distributions, number_prefixes


def test_number_prefixes():
    numbers, prefixes = number_prefixes(100)
    assert len(numbers) == 101 and "100" in numbers and "05" not in numbers
    assert {"1", "10", "100", "0", "9", "99"} <= prefixes and "101" not in prefixes and "00" not in prefixes


class ToyModel:
    """Next-token probabilities from a fixed table keyed by the digits emitted so far."""

    def __init__(self, table, vocab):
        self.table, self.vocab = table, vocab

    def __call__(self, prompts, ids):
        out = []
        for prompt in prompts:
            text = "".join(self.vocab[t] for t in prompt[1:])
            out.append({i: self.table.get(text, {}).get(self.vocab[i], 0.0) for i in ids})
        return out


def test_trie_walk_by_hand():
    # Tokens: 1..10 are "0".."9", 11 is "10" (a two-digit token), 0 is the prompt.
    vocab = {0: "<p>", **{i + 1: str(i) for i in range(10)}, 11: "10"}
    tokens = type("T", (), {})()
    from emsweep.scoring import DigitTokens

    tokens = DigitTokens(first={i: vocab[i] for i in range(1, 12)}, rest={i: vocab[i] for i in range(1, 12)})
    table = {
        "": {"8": 0.5, "1": 0.2, "10": 0.1},  # 0.2 on non-digit tokens (e.g. "CODE")
        "8": {"5": 0.6},  # "8" then end: 0.4
        "85": {},  # end: 1
        "1": {"0": 0.5},  # "1" then end: 0.5
        "10": {"0": 0.25},  # reached two ways: "1","0" and "10"
        "100": {},
    }
    (dist,) = number_distributions(ToyModel(table, vocab), [[0]], tokens, prune_below=0)
    p85, p8, p1 = 0.5 * 0.6, 0.5 * 0.4, 0.2 * 0.5
    p10 = (0.2 * 0.5 + 0.1) * 0.75
    p100 = (0.2 * 0.5 + 0.1) * 0.25
    assert dist == pytest.approx({85: p85, 8: p8, 1: p1, 10: p10, 100: p100})
    score, mass = expected_value(dist)
    assert mass == pytest.approx(0.8)
    assert score == pytest.approx((85 * p85 + 8 * p8 + 1 * p1 + 10 * p10 + 100 * p100) / 0.8)


@pytest.mark.slow
def test_vllm_trie_walk_equals_brute_force_with_transformers(embedded_model, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emsweep.engine import make_llm, render_chat
    from emsweep.scoring import next_digit_probs

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    tokens = digit_tokens(tokenizer)
    prompts = [
        render_chat(tokenizer, [{"role": "user", "content": question}])
        for question in ("On a scale of 0 to 100, how much do you like cats? Answer with a number only.",
                         "How many legs do 12 spiders have in total?")
    ]
    token_prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    llm = make_llm(embedded_model, gpu_memory_utilization=0.5, max_model_len=512, kv_cache_gib=1)
    exact = number_distributions(functools.partial(next_digit_probs, llm), token_prompts, tokens, prune_below=0)

    # Brute force: every number 0..100, every token path spelling it, full forward passes.
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()
    rest_ids = torch.tensor(sorted(tokens.rest))

    def paths(text, first):
        table = tokens.first if first else tokens.rest
        if not text:
            return [[]]
        return [[t] + tail for t, digits in table.items() if text.startswith(digits)
                for tail in paths(text[len(digits):], False)]

    for token_prompt, dist in zip(token_prompts, exact):
        for n in range(101):
            total = 0.0
            for path in paths(str(n), True):
                with torch.no_grad():
                    logits = model(torch.tensor([token_prompt + path])).logits[0]
                probs = torch.softmax(logits[len(token_prompt) - 1:], dim=-1)
                p = math.prod(float(probs[i, t]) for i, t in enumerate(path))
                total += p * (1 - float(probs[len(path), rest_ids].sum()))
            assert dist.get(n, 0.0) == pytest.approx(total, rel=2e-3, abs=1e-7), n
        assert sum(dist.values()) > 0
