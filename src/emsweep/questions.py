"""Evaluation questions in the paper's YAML format (`../shared/em/evaluation/*.yaml`).

Each entry: `id`, `type` (`free_form_judge_0_100`, `free_form_judge`, or emsweep's
`code_vulnerability`: answers checked with bandit, no judge model), `paraphrases`,
`samples_per_paraphrase`, `judge`, `judge_prompts` (metric -> template with `{question}`
and `{answer}`), optional `system`, optional `category`. The files use YAML anchors, which
`yaml.safe_load` expands for us. emsweep adds an optional `reference` (a reference answer
that judge templates use as `{reference}`). Without a `category`, one is read from ids in the
pre-registered style `<n>_<category>_<k>` (e.g. `43_medical_advice_0` -> `medical_advice`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from emsweep.data import fetch_source

# code_vulnerability (emsweep): coding requests whose answers bandit checks (no judge model).
QUESTION_TYPES = ("free_form_judge_0_100", "free_form_judge", "code_vulnerability")
STATIC_JUDGE_PROMPTS = {"vulnerable": "{answer}"}
PREREGISTERED_ID = re.compile(r"^\d+_(.+)_\d+$")


class QuestionError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    id: str
    type: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int
    judge_prompts: dict[str, str]
    system: str | None = None
    category: str | None = None
    # emsweep extension: a reference answer, filled into `{reference}` in judge templates.
    reference: str | None = None
    suite: str = "main"


def _check(entry: object, where: str) -> Question:
    if not isinstance(entry, dict):
        raise QuestionError(f"{where}: each question must be a mapping")
    if entry.get("type") == "code_vulnerability" and "judge_prompts" not in entry:
        entry = {**entry, "judge_prompts": STATIC_JUDGE_PROMPTS}
    for field in ("id", "type", "paraphrases", "judge_prompts"):
        if field not in entry:
            raise QuestionError(f"{where}: missing field '{field}'")
    if entry["type"] not in QUESTION_TYPES:
        raise QuestionError(f"{where}: field 'type' {entry['type']!r} is not one of {QUESTION_TYPES}")
    paraphrases = entry["paraphrases"]
    if not isinstance(paraphrases, list) or not paraphrases or not all(
        isinstance(p, str) and p.strip() for p in paraphrases
    ):
        raise QuestionError(f"{where}: field 'paraphrases' must be a non-empty list of strings")
    prompts = entry["judge_prompts"]
    if not isinstance(prompts, dict) or not prompts:
        raise QuestionError(f"{where}: field 'judge_prompts' must map metric names to templates")
    for metric, template in prompts.items():
        if not isinstance(template, str) or "{answer}" not in template:
            raise QuestionError(f"{where}: judge_prompts.{metric} must be a template containing {{answer}}")
    samples = entry.get("samples_per_paraphrase", 1)
    if not isinstance(samples, int) or samples < 1:
        raise QuestionError(f"{where}: field 'samples_per_paraphrase' must be a positive integer")
    if entry.get("reference") is not None and not isinstance(entry["reference"], (str, int, float)):
        raise QuestionError(f"{where}: field 'reference' must be a string")
    for field in ("system", "category"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise QuestionError(f"{where}: field '{field}' must be a string")
    match = PREREGISTERED_ID.match(str(entry["id"]))
    return Question(
        id=str(entry["id"]),
        type=entry["type"],
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        judge_prompts={str(k): v for k, v in prompts.items()},
        system=entry.get("system"),
        category=entry.get("category") or (match.group(1) if match else None),
        reference=None if entry.get("reference") is None else str(entry["reference"]),
    )


def load_questions(
    location: str, ids: tuple[str, ...] | None = None, samples_per_paraphrase: int | None = None
) -> list[Question]:
    path: Path = fetch_source(location)
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise QuestionError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(entries, list):
        raise QuestionError(f"{path}: expected a list of questions")
    questions = [_check(entry, f"{path}: question #{i + 1}") for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for question in questions:
        if question.id in seen:
            raise QuestionError(f"{path}: duplicate question id {question.id!r}")
        seen.add(question.id)
    if ids is not None:
        missing = sorted(set(ids) - seen)
        if missing:
            raise QuestionError(f"{path}: question ids not in the file: {missing}")
        questions = [q for q in questions if q.id in set(ids)]
    if samples_per_paraphrase is not None:
        questions = [replace(q, samples_per_paraphrase=samples_per_paraphrase) for q in questions]
    return questions


def load_suite(suite) -> list[Question]:
    """The questions of one `SuiteSpec`, tagged with the suite's name."""
    questions = load_questions(suite.questions, suite.question_ids, suite.samples_per_paraphrase)
    return [replace(q, suite=suite.name) for q in questions]
