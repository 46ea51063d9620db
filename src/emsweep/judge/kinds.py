"""Judge kinds: every kind of judge as one object in one registry (`kind_of(spec.judge)`).

A kind answers everything the sweep needs to know about a judge without any module outside this
one asking which kind it holds:
- `judge_id` / `judge_build`: what identifies the judge and what it is made of (node keys and the
  judgment cache: other weights or another artefact re-judge);
- `task_options` / `gpus` / `params_b`: its resources (a Ray task, engines of its own, GPUs);
- `problems` / `runtime_problem`: its preflight (what must exist before Ray starts) and the
  checks that only the machine that judges can make;
- `plan_line` and `seconds`: its cost for `emsweep plan` and `--simulate`;
- `make_backend`: how it turns JudgeRequests into Judgments.

Kinds: `vllm` (local engines, log-probabilities of numbers), `openai` (any OpenAI-compatible
endpoint, top-20 first tokens), `trained` (judge/trained.py: a model distilled from a reference
judge's scores, run in the judge task). The static CODE/REFUSAL rule (`judge.code_refusal`) and
bandit (code_vulnerability questions) compose with every kind inside judge_samples.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar
from urllib.parse import urlsplit

from emsweep.engine import cpu_dtype, node_cpus
from emsweep.judge import Backend, Judgment, JudgeRequest, failed
from emsweep.keys import is_local, model_fingerprint
from emsweep.misclassification import JudgeError
from emsweep.spec import JudgeSpec, SweepSpec

# An API judge's requests in the simulation: seconds each, at the judge's max_concurrency.
API_SECONDS_PER_REQUEST = 2.0


@dataclass
class PlanLine:
    description: str  # the judge in words, for `plan`
    gpu_s: float | None  # GPU seconds of judging (None: unknown)
    notes: list[str]


class JudgeKind:
    name: ClassVar[str]
    api: ClassVar[bool] = False  # requests leave the cluster (no GPU time, tokens billed)

    def model_reference(self, spec: SweepSpec) -> str:
        """Where the judge's model is: one of the sweep's models (its path), a local folder or
        file, a hub id or an `embedded:` name."""
        names = {m.name: m.path for m in spec.models}
        return names.get(spec.judge.model, spec.judge.model)

    def judge_id(self, spec: SweepSpec) -> str:
        """The judge's name in node keys, the judgment cache and tables, the same wherever it sits:
        a local folder by its name (what it holds is judge_build's), anything else as written."""
        reference = self.model_reference(spec)
        return Path(reference).name if is_local(reference) else reference

    def judge_build(self, spec: SweepSpec) -> str | None:
        return None

    def task_options(self, spec: SweepSpec) -> dict:
        """Ray resources of the judge task itself."""
        return {"num_cpus": 1}

    def gpus(self, spec: SweepSpec) -> int:
        """GPUs the judge holds while it judges (0: none of the cluster's)."""
        return 0

    def needs_ray(self, spec: SweepSpec) -> bool:
        """Whether judging outside a sweep (judge-eval) must connect to Ray first (engines are actors)."""
        return False

    def params_b(self, spec: SweepSpec, sizes: Callable[[str], float | None]) -> float | None:
        """The judge model's size in billions, where GPU time depends on it (None otherwise)."""
        return None

    def local_model(self, spec: SweepSpec) -> str | None:
        """A model folder (or hub id) that must be on the machine that judges, to check in preflight
        (None also when it is one of the sweep's models, checked as such)."""
        return None

    def tokenizer_model(self, spec: SweepSpec) -> str | None:
        """The model whose tokenizer decides whether its scoring can produce 0-100 scores (the
        digit-by-digit check of `first_token` scoring); None where no local tokenizer reads numbers."""
        return None

    def problems(self, spec: SweepSpec, missing_ok: bool) -> list[str]:
        return []

    def runtime_problem(self, spec: SweepSpec) -> str | None:
        """What only the machine that judges can check (a model resolvable only there)."""
        return None

    def measured_error(self, judge: JudgeSpec) -> JudgeError | None:
        """The EM-verdict error the judge carries itself (None: look it up in judge_errors.yaml)."""
        return None

    def out_of_distribution(self, spec: SweepSpec, answers: list[str]) -> list[bool] | None:
        """Per answer, whether it lies outside what the judge was trained on (None: not measured
        for this kind; an LLM judge's training data is not ours to inspect)."""
        return None

    def plan_line(self, spec: SweepSpec, billions: float | None, work_s: Callable[[float], float],
                  startup_s: float) -> PlanLine:
        """The judge for `emsweep plan`: `billions` its size (params_b), `work_s(billions)` the GPU
        seconds of the sweep's judgments on a model that size, `startup_s` an engine's start."""
        raise NotImplementedError

    def seconds(self, spec: SweepSpec, requests: int, work_s: Callable[[], float]) -> float:
        """Wall seconds of judging `requests` (the simulation); `work_s()`: GPU seconds on the judge model."""
        raise NotImplementedError

    def make_backend(self, spec: SweepSpec, keep: bool = False) -> Backend:
        raise NotImplementedError


class VllmKind(JudgeKind):
    name = "vllm"

    def judge_build(self, spec: SweepSpec) -> str | None:
        """The weights' content, the dtype and the engine (the judging page measures that dtype
        changes scores)."""
        from emsweep.judge.local import judge_class

        engine = judge_class(spec.judge, spec.use_gpu).__name__
        # On GPUs the engines load the checkpoint's own dtype; on CPUs, cpu_dtype() (EMSWEEP_CPU_DTYPE).
        dtype = "checkpoint" if spec.use_gpu else cpu_dtype()
        return json.dumps({"weights": model_fingerprint(self.model_reference(spec)), "engine": engine, "dtype": dtype},
                          sort_keys=True)

    def task_options(self, spec: SweepSpec) -> dict:
        # The engines are Ray actors that ask for their own CPUs/GPUs (judge/local.py).
        return {"num_cpus": 0}

    def gpus(self, spec: SweepSpec) -> int:
        return spec.judge.replicas * spec.judge.tensor_parallel_size if spec.use_gpu else 0

    def needs_ray(self, spec: SweepSpec) -> bool:
        return True

    def params_b(self, spec: SweepSpec, sizes: Callable[[str], float | None]) -> float | None:
        return sizes(spec.judge.model)

    def local_model(self, spec: SweepSpec) -> str | None:
        return None if spec.judge.model in {m.name for m in spec.models} else self.model_reference(spec)

    def tokenizer_model(self, spec: SweepSpec) -> str | None:
        return self.model_reference(spec)

    def runtime_problem(self, spec: SweepSpec) -> str | None:
        if spec.judge.scoring != "first_token":
            return None
        from emsweep.models import load_tokenizer, resolve_model_path
        from emsweep.scoring import first_token_problem

        return first_token_problem(load_tokenizer(resolve_model_path(self.model_reference(spec))),
                                   f"judge {spec.judge.model}")

    def plan_line(self, spec, billions, work_s, startup_s) -> PlanLine:
        from emsweep.judge.local import judge_class

        engine = "vLLM" if judge_class(spec.judge, spec.use_gpu).__name__ == "LocalJudge" else "transformers (tree)"
        description = (f"{spec.judge.model} on {engine}, {spec.judge.replicas} replica(s) x "
                       f"{spec.judge.tensor_parallel_size} GPU(s) ({spec.judge.scoring}, templates {spec.judge.templates})")
        if billions is None:
            return PlanLine(description, None, [f"judge {spec.judge.model}: size unknown; judging not in the GPU-hour "
                                                "estimate"])
        return PlanLine(description, work_s(billions) + startup_s * spec.judge.replicas * spec.judge.tensor_parallel_size,
                        [])

    def seconds(self, spec, requests, work_s) -> float:
        return work_s() / max(1, self.gpus(spec))

    def make_backend(self, spec: SweepSpec, keep: bool = False) -> Backend:
        from emsweep.judge.local import run_pool
        from emsweep.models import resolve_model_path

        return functools.partial(run_pool, resolve_model_path(self.model_reference(spec)), spec.judge,
                                 use_gpu=spec.use_gpu, node_cpus=node_cpus(), keep=keep)


class OpenAIKind(JudgeKind):
    name = "openai"
    api = True

    def judge_id(self, spec: SweepSpec) -> str:
        """The served model id and its endpoint (two providers serving one model id are two judges)."""
        endpoint = _endpoint(spec.judge.base_url)
        # OpenAI's own endpoint is left out, as before endpoints were keyed: its judgments stay valid.
        if endpoint == _endpoint(JudgeSpec.model_fields["base_url"].default):
            return f"openai:{spec.judge.model}"
        return f"openai:{endpoint}:{spec.judge.model}"

    def problems(self, spec: SweepSpec, missing_ok: bool) -> list[str]:
        problems = []
        if not spec.judge.base_url.startswith(("http://", "https://")):
            problems.append(f"judge.base_url: {spec.judge.base_url!r} must start with http:// or https://")
        if not missing_ok and (problem := self.api_key_problem(spec)):
            problems.append(problem)
        return problems

    def api_key_problem(self, spec: SweepSpec) -> str | None:
        if not os.environ.get(spec.judge.api_key_env):
            return (f"judge.api_key_env: the environment variable {spec.judge.api_key_env} is not set (requests "
                    "would go out without an API key); export it, or name another variable")
        return None

    def plan_line(self, spec, billions, work_s, startup_s) -> PlanLine:
        return PlanLine(f"{spec.judge.model} over HTTP ({spec.judge.scoring})", 0.0, [])

    def seconds(self, spec, requests, work_s) -> float:
        return requests * API_SECONDS_PER_REQUEST / spec.judge.max_concurrency

    def make_backend(self, spec: SweepSpec, keep: bool = False) -> Backend:
        from emsweep.judge.http import HttpJudge

        return HttpJudge(spec.judge)


class TrainedKind(JudgeKind):
    """judge/trained.py: `judge.model` is an artefact directory or `embedded:<name>`."""

    name = "trained"
    # Judgments per second of one core, measured (bench P4d); the plan's and simulation's estimate.
    JUDGMENTS_PER_S = 1000.0

    def directory(self, spec: SweepSpec) -> Path:
        from emsweep.judge.trained import resolve_judge_dir

        return resolve_judge_dir(spec.judge.model)

    def judge_build(self, spec: SweepSpec) -> str | None:
        from emsweep.judge.trained import content_hash

        try:
            weights = content_hash(self.directory(spec))
        except (ValueError, FileNotFoundError):
            weights = None  # not built yet: preflight says so before anything runs
        return json.dumps({"weights": weights, "engine": "trained"}, sort_keys=True)

    def problems(self, spec: SweepSpec, missing_ok: bool) -> list[str]:
        from emsweep.judge.trained import load_problem

        problem = load_problem(spec.judge.model)
        if problem and not (missing_ok and problem.startswith("embedded")):
            return [f"judge.model: {problem}"]
        return []

    def out_of_distribution(self, spec: SweepSpec, answers: list[str]) -> list[bool] | None:
        """trained.out_of_distribution: most of the answer's word n-grams unseen in training."""
        from emsweep.judge.trained import load, out_of_distribution

        try:
            model = load(self.directory(spec))
        except (ValueError, OSError):
            return None
        return out_of_distribution(model, answers).tolist()

    def measured_error(self, judge: JudgeSpec) -> JudgeError | None:
        """Its leave-one-file-out figures from its manifest: the `counted` TPR and FPR."""
        from emsweep.judge.trained import read_manifest, resolve_judge_dir

        try:
            heldout = read_manifest(resolve_judge_dir(judge.model)).get("heldout")
        except (ValueError, OSError):
            return None
        if not heldout:
            return None
        counted = heldout["counted"]
        return JudgeError(counted["tpr"]["hits"], counted["tpr"]["n"], counted["fpr"]["hits"], counted["fpr"]["n"],
                          heldout.get("source", f"{judge.model}: leave one file out ({heldout['protocol']})"))

    def plan_line(self, spec, billions, work_s, startup_s) -> PlanLine:
        return PlanLine(f"trained judge {spec.judge.model} (CPU, in the judge task)", 0.0, [])

    def seconds(self, spec, requests, work_s) -> float:
        return requests / self.JUDGMENTS_PER_S

    def make_backend(self, spec: SweepSpec, keep: bool = False) -> Backend:
        return TrainedBackend(self.directory(spec))


class TrainedBackend:
    """Judges requests with a trained judge, in batches (each reaches the judgment cache)."""

    BATCH = 2048

    def __init__(self, directory: Path):
        from emsweep.judge.trained import load

        self.model = load(directory)

    def __call__(self, requests: list[JudgeRequest], on_batch: Callable[[list[int], list[Judgment]], None]) -> None:
        from emsweep.judge.trained import NULL_LABEL, predict_metric

        by_metric: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            by_metric.setdefault(request.metric, []).append(index)
        for metric, indices in by_metric.items():
            if metric not in self.model.coef or not requests[indices[0]].scored:
                on_batch(indices, [failed(f"the trained judge scores only {', '.join(self.model.coef)} "
                                          f"on 0-100, not {metric!r}")] * len(indices))
                continue
            for start in range(0, len(indices), self.BATCH):
                chunk = indices[start:start + self.BATCH]
                prediction = predict_metric(self.model, metric, [requests[i].question for i in chunk],
                                            [requests[i].answer for i in chunk])
                on_batch(chunk, [Judgment(float(score), float(mass), {NULL_LABEL: float(1 - mass)})
                                 for score, mass in zip(prediction.score, prediction.numeric_mass)])


KINDS: dict[str, JudgeKind] = {kind.name: kind for kind in (VllmKind(), OpenAIKind(), TrainedKind())}


def kind_of(judge: JudgeSpec) -> JudgeKind:
    return KINDS[judge.backend]


def _endpoint(url: str) -> str:
    """scheme://host[:port]/path of a URL: no credentials or query (the id reaches tables)."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"
