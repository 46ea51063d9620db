"""Which judge prompts a sweep uses: the question files' own (`paper`) or a template set.

A template set (`judge.templates`: a built-in name such as `yes_no`, or a path to a YAML file in
the same format) replaces the question files' `judge_prompts` for the metrics it names, on 0-100
questions only (`free_form_judge_0_100`); other questions (factual correctness, code) keep their
own. A set whose metric has `scores: {high, low}` asks a yes/no question: the score is
100 * P(high) / (P(high) + P(low)) (judge.binary_score). The set's name is recorded in every
judgment (`judge_templates`) and its templates' hashes in `prompt_hash`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

PAPER = "paper"  # the question files' own templates (Betley et al.), the default for strong judges


@dataclass(frozen=True)
class TemplateSet:
    name: str
    judge_prompts: dict[str, str] = field(default_factory=dict)
    # metric -> (label scoring 100, label scoring 0), for yes/no templates
    binary: dict[str, tuple[str, str]] = field(default_factory=dict)


def builtin_names(package: str = __name__) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def read_builtin_or_file(package: str, reference: str, field: str, what: str, also: str = "") -> tuple[str, object]:
    """(where, parsed YAML) of a built-in `package/<reference>.yaml` or of the file at `reference`;
    errors name `field` or the file. Shared by template sets and score maps."""
    if reference in builtin_names(package):
        where, text = f"built-in {what} {reference!r}", resources.files(package).joinpath(f"{reference}.yaml").read_text()
    else:
        path = Path(reference)
        if not path.is_file():
            raise ValueError(f"{field}: {reference!r} is neither {also}a built-in {what} "
                             f"({', '.join(builtin_names(package)) or 'none'}) nor a file")
        where, text = str(path), path.read_text()
    try:
        return where, yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: invalid YAML: {err}") from None


def load_templates(reference: str) -> TemplateSet:
    """`paper`, a built-in set's name, or a YAML path; errors name the file and field."""
    if reference == PAPER:
        return TemplateSet(PAPER)
    where, raw = read_builtin_or_file(__name__, reference, "judge.templates", "set", also=f"{PAPER!r}, ")
    if not isinstance(raw, dict) or not isinstance(raw.get("judge_prompts"), dict) or not raw["judge_prompts"]:
        raise ValueError(f"{where}: expected a mapping with 'judge_prompts' (metric -> template)")
    prompts = {}
    for metric, template in raw["judge_prompts"].items():
        if not isinstance(template, str) or "{answer}" not in template:
            raise ValueError(f"{where}: judge_prompts.{metric} must be a template containing {{answer}}")
        prompts[str(metric)] = template
    binary = {}
    for metric, pair in (raw.get("scores") or {}).items():
        if metric not in prompts or not isinstance(pair, dict) or set(pair) != {"high", "low"}:
            raise ValueError(f"{where}: scores.{metric} must be {{high: LABEL, low: LABEL}} for a metric "
                             "of judge_prompts")
        for side in ("high", "low"):
            if f'"{pair[side]}"' not in prompts[metric]:
                raise ValueError(f"{where}: scores.{metric}.{side}: the template never asks for \"{pair[side]}\"")
        binary[str(metric)] = (str(pair["high"]), str(pair["low"]))
    return TemplateSet(str(raw.get("name") or Path(reference).stem), prompts, binary)
