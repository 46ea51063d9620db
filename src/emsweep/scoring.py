"""Exact probability of each integer answer 0..max_value under a judge model, for any tokenizer.

The paper reads the judge's first token only, which is exact for GPT-4o (every number up
to 999 is one token) but not for open models that split numbers into digits: "85" is
"8" then "5". Here the probability that the judge answers the number n is

    P(n) = sum over token paths t_1..t_k spelling n of  prod_i P(t_i | prompt, t_<i) * P(end | prompt, t_1..t_k)

where each t_i is a token made only of ASCII digits (the first may carry leading whitespace)
and "end" means the next token is not such a digit token. The paths form a trie over the
strings "0".."max_value" that we walk level by level, one batched vLLM call per level with
`logprob_token_ids` set to the digit tokens, so each trie node costs one single-token step
on a cached prompt prefix. Paths whose probability is at or below `prune_below` are not
extended (their whole subtree carries at most that much mass; the default 1e-7 bounds the
error of a 0-100 expected value by about 1e-5 per pruned path).

That walk costs one engine step per trie node (about 100 for 0-100 with digit tokens), and on a
CPU each step recomputes up to a 32-token block of the cached prompt. `ScoreTree` computes the
same P(n) in one forward pass instead: the prompt followed by every trie node at once, each node
attending to the prompt and its own ancestors only (a tree attention mask, positions by depth),
so the logits at each node are exactly P(next | prompt, path) (judge.local.TreeJudge). Label
sequences (CODE, REF+USAL) ride in the same tree.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

DIGITS = re.compile(r"^[0-9]+$")
LEADING_SPACE_DIGITS = re.compile(r"^\s*[0-9]+$")
MAX_IDS_PER_REQUEST = 128  # vLLM's cap on logprob_token_ids


@dataclass(frozen=True)
class DigitTokens:
    first: dict[int, str]  # token id -> digits, allowed as the first token (leading space ok)
    rest: dict[int, str]  # token id -> digits, allowed after the first token

    @property
    def all_ids(self) -> list[int]:
        return sorted(set(self.first) | set(self.rest))


def digit_tokens(tokenizer) -> DigitTokens:
    first, rest = {}, {}
    for token, token_id in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if LEADING_SPACE_DIGITS.match(text):
            first[token_id] = text.strip()
        if DIGITS.match(text):
            rest[token_id] = text
    return DigitTokens(first, rest)


def number_prefixes(max_value: int) -> tuple[set[str], set[str]]:
    """Valid number strings ("0".."max_value", no leading zeros) and all their prefixes."""
    numbers = {str(n) for n in range(max_value + 1)}
    return numbers, {number[:k] for number in numbers for k in range(1, len(number) + 1)}


def next_digit_probs(llm, token_prompts: list[list[int]], ids: list[int], lora_request=None) -> list[dict[int, float]]:
    """P(next token = id) for each prompt and each id, by one vLLM call per chunk of ids."""
    from vllm import SamplingParams, TokensPrompt

    probs: list[dict[int, float]] = [{} for _ in token_prompts]
    for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
        chunk = ids[start : start + MAX_IDS_PER_REQUEST]
        params = SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=chunk)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params,
                               lora_request=lora_request, use_tqdm=False)
        for index, output in enumerate(outputs):
            step = output.outputs[0].logprobs[0]
            for token_id in chunk:
                probs[index][token_id] = math.exp(step[token_id].logprob)
    return probs


def number_distributions(
    next_probs, token_prompts: list[list[int]], tokens: DigitTokens, max_value: int = 100, prune_below: float = 1e-7
) -> list[dict[int, float]]:
    """P(answer = n) for n in 0..max_value, per prompt (n with zero probability omitted).

    `next_probs(prompts, ids)` returns, per prompt, P(next token = id) for every id; with vLLM
    it is `functools.partial(next_digit_probs, llm)`. Tests pass a brute-force version.
    """
    numbers, prefixes = number_prefixes(max_value)
    ids = tokens.all_ids
    results: list[dict[int, float]] = [defaultdict(float) for _ in token_prompts]
    # frontier entries: (prompt index, path token ids, digits so far, path probability)
    frontier = [(index, [], "", 1.0) for index in range(len(token_prompts))]
    while frontier:
        step = next_probs([token_prompts[i] + path for i, path, _, _ in frontier], ids)
        next_frontier = []
        for (index, path, text, path_prob), probs in zip(frontier, step):
            allowed = tokens.first if not path else tokens.rest
            if text:
                continuing = sum(p for token_id, p in probs.items() if token_id in tokens.rest)
                if text in numbers:
                    results[index][int(text)] += path_prob * max(0.0, 1.0 - continuing)
            for token_id, p in probs.items():
                digits = allowed.get(token_id)
                if digits is None or text + digits not in prefixes or path_prob * p <= prune_below:
                    continue
                next_frontier.append((index, path + [token_id], text + digits, path_prob * p))
        frontier = next_frontier
    return [dict(r) for r in results]


def unspellable_numbers(tokens: DigitTokens, max_value: int = 100) -> list[int]:
    """The numbers 0..max_value that no single token spells (with or without a leading space)."""
    whole = set(tokens.first.values())
    return [n for n in range(max_value + 1) if str(n) not in whole]


def first_token_problem(tokenizer, who: str, max_value: int = 100) -> str | None:
    """Why `first_token` scoring cannot measure with this tokenizer (None when it can).

    Reading the first token only is exact when every number 0..max_value is one token (GPT-4o).
    A tokenizer that spells "85" as "8", "5" makes every score the expected first digit, 0-9:
    `coherent > 50` never holds and every EM rate is NaN."""
    missing = unspellable_numbers(digit_tokens(tokenizer), max_value)
    if not missing:
        return None
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    return (f"{who}: scoring 'first_token' reads only the first token, but this tokenizer has no single token "
            f"for {len(missing)} of the numbers 0-{max_value} ({shown}), so no score could exceed the numbers "
            "it has; use scoring: exact")


def is_ascii_number(text: str) -> bool:
    # str.isdigit() is True for "²" and other non-ASCII digits, which int() rejects or misreads.
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class ScoreTree:
    """The token trie of every number path 0..max_value and every label's token sequence.

    nodes[i] = (token id, parent index or -1 for the prompt's last token). Reading P(next | path)
    at node i needs the logits there; the root's are those of the prompt's last token."""

    nodes: tuple[tuple[int, int], ...]
    number_nodes: tuple[tuple[int, int], ...]  # (node index, number) where a path spells a number
    label_paths: dict[str, tuple[tuple[int, int], ...]]  # label -> ((node whose logits, token id), ...)
    rest_ids: tuple[int, ...]  # tokens that continue a number (their mass is "not ended")

    @property
    def depths(self) -> list[int]:
        depths: list[int] = []
        for _, parent in self.nodes:
            depths.append(0 if parent < 0 else depths[parent] + 1)
        return depths


def score_tree(tokens: DigitTokens, labels: dict[str, list[int]], max_value: int = 100) -> ScoreTree:
    numbers, prefixes = number_prefixes(max_value)
    nodes: list[tuple[int, int]] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node, so label paths share nodes

    def node(parent: int, token_id: int) -> int:
        if (parent, token_id) not in index:
            nodes.append((token_id, parent))
            index[(parent, token_id)] = len(nodes) - 1
        return index[(parent, token_id)]

    number_nodes = []
    frontier = [(-1, "")]
    while frontier:
        next_frontier = []
        for parent, text in frontier:
            for token_id, digits in sorted((tokens.first if parent < 0 else tokens.rest).items()):
                if text + digits in prefixes:
                    child = node(parent, token_id)
                    if text + digits in numbers:
                        number_nodes.append((child, int(text + digits)))
                    next_frontier.append((child, text + digits))
        frontier = next_frontier
    label_paths = {}
    for label, sequence in labels.items():
        steps, parent = [], -1
        for position, token_id in enumerate(sequence):
            steps.append((parent, token_id))
            if position < len(sequence) - 1:  # the last token's own logits are never read
                parent = node(parent, token_id)
        label_paths[label] = tuple(steps)
    return ScoreTree(tuple(nodes), tuple(number_nodes), label_paths, tuple(sorted(tokens.rest)))


def read_tree(tree: ScoreTree, probs) -> tuple[dict[int, float], dict[str, float]]:
    """(P(answer = n) per number, P(label) per label) from next-token probabilities per tree row.

    `probs` rows: 0 is the prompt's last token, 1 + i is node i (a [1 + nodes, vocab] array)."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float64)
    path_prob = []
    for token_id, parent in tree.nodes:
        path_prob.append(probs[parent + 1, token_id] * (path_prob[parent] if parent >= 0 else 1.0))
    rest = list(tree.rest_ids)
    distribution: dict[int, float] = defaultdict(float)
    for node, number in tree.number_nodes:
        ended = max(0.0, 1.0 - float(probs[node + 1, rest].sum()))
        distribution[number] += float(path_prob[node]) * ended
    label_probs = {label: math.prod(float(probs[parent + 1, token_id]) for parent, token_id in steps)
                   for label, steps in tree.label_paths.items()}
    return {n: p for n, p in distribution.items() if p > 0}, label_probs


def first_token_numbers(token_probs: dict[str, float], max_value: int = 100) -> dict[int, float]:
    """P(answer = n) read from first tokens only (the paper's method; exact when numbers are one token)."""
    numbers: dict[int, float] = {}
    for token, prob in token_probs.items():
        text = token.strip()
        if is_ascii_number(text) and 0 <= int(text) <= max_value:
            # Tokens " 7" and "7" are the same answer; add their probabilities.
            numbers[int(text)] = numbers.get(int(text), 0.0) + prob
    return numbers


def expected_value(distribution: dict[int, float]) -> tuple[float | None, float]:
    """(expected number renormalised over the numeric mass, numeric mass)."""
    mass = sum(distribution.values())
    if mass <= 0:
        return None, 0.0
    return sum(n * p for n, p in distribution.items()) / mass, mass


def sequence_probs(next_probs, token_prompts: list[list[int]], sequences: dict[str, list[int]]) -> list[dict[str, float]]:
    """P(the answer starts with each label's token sequence), per prompt.

    Categorical judge answers (CODE, REFUSAL, TRUE, FALSE, UNKNOWN) are often several tokens
    for open tokenizers ("REF" "USAL"); the probability of a label is the product of the
    next-token probabilities along its tokenization, one batched call per depth.
    """
    results = [{label: 1.0 for label in sequences} for _ in token_prompts]
    depth = 0
    while True:
        needed: dict[tuple[int, tuple[int, ...]], None] = {}
        for label, sequence in sequences.items():
            if len(sequence) > depth:
                for index, probs in enumerate(results):
                    if probs[label] > 0:
                        needed[(index, tuple(sequence[:depth]))] = None
        if not needed:
            return results
        ids = sorted({sequence[depth] for sequence in sequences.values() if len(sequence) > depth})
        step = next_probs([token_prompts[index] + list(prefix) for index, prefix in needed], ids)
        lookup = dict(zip(needed, step))
        for label, sequence in sequences.items():
            if len(sequence) > depth:
                for index, probs in enumerate(results):
                    if probs[label] > 0:
                        probs[label] *= lookup[(index, tuple(sequence[:depth]))][sequence[depth]]
        depth += 1
