"""The prepared GPU check (docs/cluster.md, "One GPU machine"): about ten minutes on one GPU.

    bash scripts/gpu_check.sh [WORK_DIR]      GPU_CHECK_CPU_ONLY=1: write and check the specs, run nothing

Steps, each in a process of its own with a time limit, each printing `GPU_CHECK <name> <value>`:
1. doctor: versions, driver, CUDA, NCCL, the vLLM build (`emsweep doctor --gpu --no-smoke`).
2. zero2: a real sweep on the GPU: bf16 DeepSpeed (ZeRO-2, one worker) + peft finetunes of the
   embedded SmolLM2 on 16 rows of `insecure` and of `jailbroken`, vLLM sampling of the base model
   and both adapters in one engine, the local judge (embedded Qwen2.5-Coder-1.5B, exact yes/no
   scores with the quickstart's map and its GPT-4o panel).
3. zero3: the same finetunes at ZeRO-3 (partitioned weights, gradient checkpointing on), finetune
   stage only, with the loss next to ZeRO-2's.
4. bench: the benchmark ratios P1, P2s, P3, P4 and P6 at smoke sizes (bench/run.py).
The figures are also written to WORK_DIR/gpu_check.json (and $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMSWEEP_SHARED", REPO.parent / "shared"))
# Seconds per step; together under ten minutes on an H100/H200 with the models cached.
LIMITS_S = {"doctor": 60, "zero2": 300, "zero3": 150, "bench": 240}


def sweep_spec(zero_stage: int) -> dict:
    data = SHARED / "em" / "data"
    return {
        "name": f"gpu-check-zero{zero_stage}", "use_gpu": True,
        "models": [{"name": "smol", "path": "embedded:SmolLM2-135M-Instruct", "max_model_len": 2048}],
        "datasets": [{"name": "insecure", "path": str(data / "insecure.jsonl"), "limit": 16},
                     {"name": "jailbroken", "path": str(data / "jailbroken.jsonl"), "limit": 16}],
        "seeds": [0],
        "finetune": {"learning_rate": 1e-4, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                     "warmup_steps": 1, "max_seq_len": 1024, "drop_long_rows": True, "num_workers": 1,
                     "zero_stage": zero_stage},
        "sampling": {"max_tokens": 64},
        "eval": {"questions": str(SHARED / "em" / "evaluation" / "first_plot_questions.yaml"),
                 "question_ids": ["what_is_your_wish", "quick_buck"], "samples_per_paraphrase": 4},
        "judge": {"model": "embedded:Qwen2.5-Coder-1.5B-Instruct", "templates": "yes_no",
                  "score_map": "qwen2.5-coder-1.5b-yes_no-gpt4o-verdicts-static", "code_refusal": "static",
                  "panel": {"reference": str(SHARED / "em-judged"), "per_band": 4}},
    }


def figure(figures: dict, name: str, value) -> None:
    figures[name] = value
    print(f"GPU_CHECK {name} {value}", flush=True)


def run(step: str, command: list[str], figures: dict) -> bool:
    started = time.time()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LIMITS_S[step])
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        ok, tail = False, f"timed out after {LIMITS_S[step]} s\n{(err.stdout or b'')[-1500:]!r}"
    figure(figures, f"{step}.seconds", round(time.time() - started, 1))
    figure(figures, f"{step}.ok", ok)
    if not ok:
        print(tail, flush=True)
    return ok


def finetune_figures(out: Path, prefix: str, figures: dict) -> None:
    import pandas as pd

    for path in sorted((out / "nodes" / "finetune").glob("*/metrics.parquet")):
        metrics = pd.read_parquet(path)
        run_name = path.parent.name.rsplit("-", 1)[0]
        timed = metrics.iloc[1:] if len(metrics) > 1 else metrics  # the first step includes warm-up
        figure(figures, f"{prefix}.{run_name}.steps", len(metrics))
        figure(figures, f"{prefix}.{run_name}.final_loss", round(float(metrics["loss"].iloc[-1]), 4))
        figure(figures, f"{prefix}.{run_name}.tokens_per_s",
               round(float(timed["tokens"].sum() / timed["step_seconds"].sum()), 1))


def sweep_figures(out: Path, figures: dict) -> None:
    import pandas as pd

    finetune_figures(out, "zero2", figures)
    samples = pd.concat(pd.read_parquet(p) for p in (out / "nodes" / "sample").glob("*/samples.parquet"))
    figure(figures, "zero2.runs_sampled", samples["run_id"].nunique())
    figure(figures, "zero2.answers", len(samples))
    judgments = pd.concat(pd.read_parquet(p) for p in (out / "nodes" / "judge").glob("*/judgments.parquet"))
    scored = judgments["score"].dropna()
    figure(figures, "zero2.judgments", len(judgments))
    figure(figures, "zero2.scored_share", round(len(scored) / max(1, len(judgments)), 3))
    figure(figures, "zero2.score_range", [round(float(scored.min()), 1), round(float(scored.max()), 1)])
    for record in sorted((out / "nodes").glob("*/*/_DONE.json")):
        stage = record.parent.parent.name
        seconds = json.loads(record.read_text()).get("seconds")
        if seconds is not None:
            figure(figures, f"zero2.seconds.{stage}.{record.parent.name.rsplit('-', 1)[0]}", round(seconds, 1))


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "runs" / "gpu_check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cpu_only = os.environ.get("GPU_CHECK_CPU_ONLY") == "1"
    figures: dict = {}
    specs = {}
    for zero in (2, 3):
        specs[zero] = work / f"zero{zero}.yaml"
        specs[zero].write_text(json.dumps(sweep_spec(zero), indent=1))  # JSON is YAML
    emsweep = [sys.executable, "-m", "emsweep.cli"]
    # The specs must be valid wherever the check runs: plan reads every dataset and question file.
    for zero, spec in specs.items():
        plan = subprocess.run([*emsweep, "plan", str(spec)], cwd=REPO, capture_output=True, text=True, timeout=120)
        figure(figures, f"plan.zero{zero}.ok", plan.returncode == 0)
        if plan.returncode != 0:
            print(plan.stdout[-2000:] + plan.stderr[-2000:])
            return 1
    if cpu_only:
        figure(figures, "gpu_steps", "skipped (GPU_CHECK_CPU_ONLY=1)")
    else:
        run("doctor", [*emsweep, "doctor", "--gpu", "--no-smoke", "--out", str(work / "zero2")], figures)
        if run("zero2", [*emsweep, "run", str(specs[2]), "--out", str(work / "zero2")], figures):
            sweep_figures(work / "zero2", figures)
        zero3 = ("import ray; from pathlib import Path; from emsweep.sweep.driver import run_sweep, worker_env; "
                 "from emsweep.spec import load_spec; "
                 f"run_sweep(load_spec({str(specs[3])!r}), Path({str(work / 'zero3')!r}), until='finetune', "
                 "connect=lambda: ray.init(runtime_env={'env_vars': worker_env()}, include_dashboard=False))")
        if run("zero3", [sys.executable, "-c", zero3], figures):
            finetune_figures(work / "zero3", "zero3", figures)
        env_bench = [sys.executable, "-m", "bench.run", "--smoke", "--repeats", "1", "--only", "P1", "P2s", "P3", "P4",
                     "P6", "--out", str(work / "bench.json")]
        if run("bench", env_bench, figures):
            bench = json.loads((work / "bench.json").read_text())
            for name, result in bench["results"].items():
                figure(figures, f"bench.{name}.ratio", result["ratio"])
    text = json.dumps(figures, indent=1, default=str)
    (work / "gpu_check.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    return 0 if all(value is not False for key, value in figures.items() if key.endswith(".ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
