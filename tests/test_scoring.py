"""Exact 0-100 judge scores: the trie walk over vLLM and the one-forward tree (TreeJudge) equal
brute force with transformers; first-token scoring is refused where it cannot measure."""

import copy
import functools
import gc
import math

import pytest
import torch

from emsweep.scoring import (
    DigitTokens, digit_tokens, expected_value, first_token_numbers, first_token_problem, number_distributions,
    number_prefixes, read_tree, score_tree,
)


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


def test_tree_read_equals_the_trie_walk_on_a_toy_model():
    # The trie walk's toy table, read instead from one "forward" over the whole tree: row 0 is the
    # prompt's last token, row 1 + i node i, each holding P(next | its path).
    vocab = {0: "<p>", **{i + 1: str(i) for i in range(10)}, 11: "10", 12: "CO", 13: "DE"}
    tokens = DigitTokens(first={i: vocab[i] for i in range(1, 12)}, rest={i: vocab[i] for i in range(1, 12)})
    table = {"": {"8": 0.5, "1": 0.2, "10": 0.1, "CO": 0.1}, "8": {"5": 0.6}, "1": {"0": 0.5}, "10": {"0": 0.25},
             "CO": {"DE": 0.9}}
    tree = score_tree(tokens, {"CODE": [12, 13], "X": [5]})

    def texts():
        out = [""]
        for token, parent in tree.nodes:
            out.append((out[parent + 1] if parent >= 0 else "") + vocab[token])
        return out

    probs = [[table.get(text, {}).get(vocab[t], 0.0) for t in range(len(vocab))] for text in texts()]
    distribution, labels = read_tree(tree, probs)
    (walked,) = number_distributions(ToyModel(table, vocab), [[0]], tokens, prune_below=0)
    assert distribution == pytest.approx(walked)
    assert labels == pytest.approx({"CODE": 0.1 * 0.9, "X": 0.0})
    assert len([t for t, _ in tree.nodes if t in (12, 13)]) == 1  # only CODE's prefix is a node


class VocabTokenizer:
    def __init__(self, tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def test_first_token_is_refused_for_digit_by_digit_tokenizers():
    digits_only = VocabTokenizer([str(d) for d in range(10)] + ["²", "³", "¹", "Hello"])
    problem = first_token_problem(digits_only, "judge smol")
    assert "judge smol" in problem and "91 of the numbers 0-100" in problem and "exact" in problem
    whole = VocabTokenizer([str(n) for n in range(101)] + [" " + str(n) for n in range(101)])
    assert first_token_problem(whole, "judge gpt") is None


def test_non_ascii_digits_never_crash_or_count():
    # "²".isdigit() is True and int("²") raises; such tokens are not numbers.
    assert first_token_numbers({"²": 0.5, "³": 0.1, "8": 0.2, " 9": 0.1}) == pytest.approx({8: 0.2, 9: 0.1})


def brute_force(model_path: str, prompts: list[str]) -> list[dict[int, float]]:
    """P(n) for n in 0..100 per prompt: along each token path that spells n, the product of its
    next-token probabilities from plain transformers forwards (float32), times not continuing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emsweep.engine import render_chat

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokens = digit_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rest_ids = torch.tensor(sorted(tokens.rest))

    def paths(text, first):
        table = tokens.first if first else tokens.rest
        if not text:
            return [[]]
        return [[t] + tail for t, digits in table.items() if text.startswith(digits)
                for tail in paths(text[len(digits):], False)]

    results = []
    for prompt in prompts:
        token_prompt = tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": prompt}]),
                                        add_special_tokens=False)
        numbered_paths = [(n, path) for n in range(101) for path in paths(str(n), True)]
        # Every path in one batch from the prompt's KV cache (the prompt but its last token, run
        # once): the same numbers as a full forward of prompt + path per path, but the weights
        # are read once rather than 100+ times. Right padding: causal attention keeps it from
        # reaching the positions that are read.
        width = 1 + max(len(path) for _, path in numbered_paths)
        batch = torch.tensor([token_prompt[-1:] + path + [0] * (width - 1 - len(path)) for _, path in numbered_paths])
        with torch.no_grad():
            prefix = model(torch.tensor([token_prompt[:-1]]), use_cache=True).past_key_values
            prefix.batch_repeat_interleave(len(numbered_paths))
            all_probs = torch.softmax(model(batch, past_key_values=prefix).logits, dim=-1)
        dist = {n: 0.0 for n in range(101)}
        for (n, path), probs in zip(numbered_paths, all_probs):
            dist[n] += math.prod(float(probs[i, t]) for i, t in enumerate(path)) * (
                1 - float(probs[len(path), rest_ids].sum()))
        results.append(dist)
    return results


PROMPTS = ("On a scale of 0 to 100, how much do you like cats? Answer with a number only.",
           "How many legs do 12 spiders have in total? Say CODE if you cannot tell.")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["embedded_model", "qwen_judge"])
def test_tree_judge_equals_brute_force_with_transformers(model, request, monkeypatch):
    from emsweep.judge import JudgeRequest, template_labels
    from emsweep.judge.local import TreeJudge
    from emsweep.spec import judge_spec

    monkeypatch.setenv("EMSWEEP_CPU_DTYPE", "float32")
    path = request.getfixturevalue(model)
    judge = TreeJudge(path, judge_spec(model="judge"))
    requests = [JudgeRequest("{question}{answer}", prompt, "", True, template_labels(prompt)) for prompt in PROMPTS]
    judgments = judge.judge(requests)
    del judge  # the brute force below loads a second float32 copy of the model: one at a time
    gc.collect()
    for judgment, expected in zip(judgments, brute_force(path, list(PROMPTS))):
        score, mass = expected_value({n: p for n, p in expected.items() if p > 0})
        assert judgment.numeric_mass == pytest.approx(mass, rel=2e-3, abs=1e-6)
        assert judgment.expected_value == pytest.approx(score, rel=2e-3, abs=1e-3)
        assert 0 < judgment.numeric_mass <= 1.0001
    assert set(judgments[1].label_probs) == {"CODE"}


@pytest.mark.slow
def test_vllm_trie_walk_equals_brute_force_with_transformers(embedded_model, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("EMSWEEP_CPU_DTYPE", "float32")  # brute force is float32
    from transformers import AutoTokenizer

    from emsweep.engine import make_llm, render_chat
    from emsweep.scoring import next_digit_probs

    questions = ["On a scale of 0 to 100, how much do you like cats? Answer with a number only.",
                 "How many legs do 12 spiders have in total?"]
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    token_prompts = [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": q}]), add_special_tokens=False)
                     for q in questions]
    llm = make_llm(embedded_model, gpu_memory_utilization=0.5, max_model_len=512, kv_cache_gib=1)
    exact = number_distributions(functools.partial(next_digit_probs, llm), token_prompts, digit_tokens(tokenizer),
                                 prune_below=0)
    del llm
    gc.collect()
    for dist, expected in zip(exact, brute_force(embedded_model, questions)):
        for n in range(101):
            assert dist.get(n, 0.0) == pytest.approx(expected[n], rel=2e-3, abs=1e-7), n
        assert sum(dist.values()) > 0
