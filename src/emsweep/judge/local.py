"""Local judge: a pool of engine replicas, each a Ray actor, fed batches of requests.

- `LocalJudge`: a vLLM engine; `exact` scores walk the number trie one engine step per node
  (scoring.number_distributions). Used on GPUs, where a step on a cached prefix is cheap.
- `TreeJudge`: on CPUs, `exact` scores come from one transformers forward per request over the
  prompt and its whole number/label trie (scoring.ScoreTree, a tree attention mask): the same
  P(n), without about 100 engine steps that each recompute up to a 32-token block.

Each replica takes `tensor_parallel_size` GPUs (or a share of a node's CPUs); batches go to
whichever replica is free, and every finished batch is handed back at once, so the judgment
cache keeps the work of a pool that fails half way. Requests arrive sorted by template, so
a batch shares its long prefixes and the engine's prefix cache does the rest.
"""

from __future__ import annotations

import functools
from typing import Callable

from emsweep import scoring
from emsweep.engine import cpu_dtype, first_token_probs, make_llm, render_chat
from emsweep.judge import Judgment, JudgeRequest, first_token_judgment, top_alternatives
from emsweep.spec import JudgeSpec


class LocalJudge:
    """One vLLM engine that judges requests (used directly, or as a Ray actor by `run_pool`)."""

    def __init__(self, model_path: str, spec: JudgeSpec):
        self.spec = spec
        self.llm = make_llm(
            model_path,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            kv_cache_gib=spec.kv_cache_gib,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.digits = scoring.digit_tokens(self.tokenizer) if spec.scoring == "exact" else None

    def judge(self, requests: list[JudgeRequest]) -> list[Judgment]:
        from vllm import SamplingParams

        texts = [render_chat(self.tokenizer, [{"role": "user", "content": r.prompt}]) for r in requests]
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=self.spec.top_logprobs)
        first_tokens = [first_token_probs(output) for output in self.llm.generate(texts, params, use_tqdm=False)]
        if self.spec.scoring == "first_token":
            return [first_token_judgment(probs, r.labels) for probs, r in zip(first_tokens, requests)]
        return self._exact(requests, texts, first_tokens)

    def _exact(self, requests, texts, first_tokens) -> list[Judgment]:
        next_probs = functools.partial(scoring.next_digit_probs, self.llm)
        token_prompts = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        judgments = [Judgment(None, 0.0, {}, top_alternatives(probs)) for probs in first_tokens]
        numeric = [i for i, r in enumerate(requests) if r.numeric]
        distributions = scoring.number_distributions(next_probs, [token_prompts[i] for i in numeric], self.digits)
        for i, distribution in zip(numeric, distributions):
            judgments[i].expected_value, judgments[i].numeric_mass = scoring.expected_value(distribution)
        by_labels: dict[tuple[str, ...], list[int]] = {}
        for i, request in enumerate(requests):
            if request.labels:
                by_labels.setdefault(request.labels, []).append(i)
        for labels, indices in by_labels.items():
            sequences = {label: self.tokenizer.encode(label, add_special_tokens=False) for label in labels}
            probs = scoring.sequence_probs(next_probs, [token_prompts[i] for i in indices], sequences)
            for i, label_probs in zip(indices, probs):
                judgments[i].label_probs = label_probs
        return judgments


MIN_REUSED_TOKENS = 16  # below this, recomputing the prefix is cheaper than keeping the cache straight


class TreeJudge:
    """Exact scores in one forward pass per request (CPU machines; see the module docstring)."""

    def __init__(self, model_path: str, spec: JudgeSpec):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.dtype = getattr(torch, cpu_dtype())
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        # The LM head runs in float32 whatever the model's dtype: bfloat16 logits have 8 bits of
        # mantissa, so a logit near 20 moves in steps of 0.125, and a yes/no score
        # 100 * P(No) / (P(Yes) + P(No)) could only take values 50, 53.1, 56.2, 59.3, ... (measured
        # on the calibration set before this). Only the rows read (prompt's last, tree) go through it.
        head = self.model.get_output_embeddings()
        self.head_weight = head.weight.float()
        self.head_bias = None if getattr(head, "bias", None) is None else head.bias.float()
        self.digits = scoring.digit_tokens(self.tokenizer)
        self._trees: dict[tuple, scoring.ScoreTree] = {}
        self._cache, self._cached_prompt = None, []

    def tree(self, request: JudgeRequest) -> scoring.ScoreTree:
        key = (request.numeric, request.labels)
        if key not in self._trees:
            digits = self.digits if request.numeric else scoring.DigitTokens({}, {})
            labels = {label: self.tokenizer.encode(label, add_special_tokens=False) for label in request.labels}
            self._trees[key] = scoring.score_tree(digits, labels)
        return self._trees[key]

    def judge(self, requests: list[JudgeRequest]) -> list[Judgment]:
        return [self.judge_one(request) for request in requests]

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Tokens of `prompt` already in the KV cache (requests arrive sorted by template and question,
        so neighbours share everything up to the answer); the cache is cut back to them."""
        from transformers import DynamicCache

        common = 0
        for mine, cached in zip(prompt, self._cached_prompt):
            if mine != cached:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # the prompt's last row must be computed: its logits are read
        if common < MIN_REUSED_TOKENS:
            self._cache, common = DynamicCache(), 0
        elif self._cache.get_seq_length() > common:
            self._cache.crop(common - self._cache.get_seq_length())
        return common

    def judge_one(self, request: JudgeRequest) -> Judgment:
        import torch

        text = render_chat(self.tokenizer, [{"role": "user", "content": request.prompt}])
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        tree = self.tree(request)
        n_prompt, n_tree = len(prompt), len(tree.nodes)
        # Tree rows see the whole prompt, their ancestors and themselves; prompt rows are causal.
        allowed = torch.zeros(n_prompt + n_tree, n_prompt + n_tree, dtype=torch.bool)
        allowed[:n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
        allowed[n_prompt:, :n_prompt] = True
        for i, (_, parent) in enumerate(tree.nodes):
            if parent >= 0:
                allowed[n_prompt + i, n_prompt:] = allowed[n_prompt + parent, n_prompt:]
            allowed[n_prompt + i, n_prompt + i] = True
        reused = self._reuse_prefix(prompt)
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)
        input_ids = torch.tensor([(prompt + [token for token, _ in tree.nodes])[reused:]])
        positions = torch.tensor([(list(range(n_prompt)) + [n_prompt + d for d in tree.depths])[reused:]])
        with torch.inference_mode():
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=mask[None, None, reused:],
                                               position_ids=positions, past_key_values=self._cache,
                                               use_cache=True).last_hidden_state[0]
            # Only the prompt's last row and the tree rows are read (see __init__ for the float32).
            logits = torch.nn.functional.linear(hidden[-(n_tree + 1):].float(), self.head_weight, self.head_bias)
        # Keep the prompt's KV for the next request; the tree's rows are this request's only.
        self._cache.crop(-n_tree)
        self._cached_prompt = prompt
        probs = torch.softmax(logits, dim=-1)
        distribution, label_probs = scoring.read_tree(tree, probs.numpy())
        value, mass = scoring.expected_value(distribution) if request.numeric else (None, 0.0)
        top = torch.topk(probs[0], 5)
        alternatives = [(self.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
        return Judgment(value, mass, label_probs, alternatives)


def judge_class(spec: JudgeSpec, use_gpu: bool):
    """Which engine a replica runs: the one tree forward for exact scores on CPUs, vLLM otherwise."""
    return TreeJudge if spec.scoring == "exact" and not use_gpu else LocalJudge


TREE_BATCH = 32


def run_pool(
    model_path: str,
    spec: JudgeSpec,
    requests: list[JudgeRequest],
    on_batch: Callable[[list[int], list[Judgment]], None],
    *,
    use_gpu: bool,
    node_cpus: int,
    keep: bool = False,
) -> None:
    """Judge `requests` on `spec.replicas` LocalJudge actors; call on_batch per finished batch.
    `keep`: this process judges again later (a pipelined schedule's engine host): the actors and
    their engines stay up for the next call, and go when this process does (Ray kills the actors
    a process owns with it)."""
    import ray

    # The tree judge runs one forward per answer whatever the batch (its prefix cache lives in the
    # actor), so smaller batches cost nothing and report progress, and reach the judgment cache,
    # every TREE_BATCH answers. vLLM engines keep the spec's batch: they gain from big ones.
    size = min(spec.batch_size, TREE_BATCH) if judge_class(spec, use_gpu) is TreeJudge else spec.batch_size
    batches = [list(range(start, min(start + size, len(requests)))) for start in range(0, len(requests), size)]
    # A kept pool has all its replicas, so the next call (of any size) finds it as it is.
    replica_count = spec.replicas if keep else min(spec.replicas, len(batches))
    if use_gpu:
        resources = {"num_cpus": 1, "num_gpus": spec.tensor_parallel_size}
    else:
        # An engine uses every core it is given (Ray sets OMP_NUM_THREADS from num_cpus).
        resources = {"num_cpus": max(1, node_cpus // replica_count)}
    key = (model_path, spec.model_dump_json(), use_gpu, tuple(sorted(resources.items())))
    if keep and _KEPT_POOL.get("key") == key:
        replicas = _KEPT_POOL["replicas"]
    else:
        for stale in _KEPT_POOL.pop("replicas", []):
            ray.kill(stale)
        _KEPT_POOL.clear()
        replica_class = ray.remote(max_restarts=0)(judge_class(spec, use_gpu))
        replicas = [replica_class.options(**resources).remote(model_path, spec) for _ in range(replica_count)]
        if keep:
            _KEPT_POOL.update(key=key, replicas=replicas)
    try:
        pending: dict = {}
        queue = list(batches)
        for replica in replicas:
            if queue:
                batch = queue.pop(0)
                pending[replica.judge.remote([requests[i] for i in batch])] = (replica, batch)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            replica, batch = pending.pop(ready)
            on_batch(batch, ray.get(ready))
            if queue:
                batch = queue.pop(0)
                pending[replica.judge.remote([requests[i] for i in batch])] = (replica, batch)
    except BaseException:
        keep = False  # a replica may have died: the next call starts afresh
        _KEPT_POOL.clear()
        raise
    finally:
        # An engine holds its memory until its process exits.
        if not keep:
            for replica in replicas:
                ray.kill(replica)


_KEPT_POOL: dict = {}
