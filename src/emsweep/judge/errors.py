"""A judge's measured error: set in the spec (`judge.error`), or built in for the embedded judges.

The built-in figures (`judge_errors.yaml`) are the `counted` TPR and FPR of the EM verdict against
GPT-4o on the held-out (report) files of `../shared/em-judged/`, measured by
`scripts/judge_reference.sh` and written by `scripts/judge_reference_table.py`; an entry applies to
one (judge model, scoring, templates, score map, code_refusal). A trained judge carries its own:
the leave-one-file-out figures in its manifest (judge/kinds.py, `measured_error`).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import yaml

from emsweep.judge.kinds import kind_of
from emsweep.misclassification import JudgeError
from emsweep.spec import JudgeSpec


@lru_cache(maxsize=1)
def builtin_errors() -> tuple[dict, ...]:
    text = resources.files("emsweep.judge").joinpath("judge_errors.yaml").read_text()
    return tuple((yaml.safe_load(text) or {}).get("judges", []))


def _builtin_map_name(reference: str | None) -> str | None:
    """A built-in map's name as the spec holds it; a map file (a resolved path) is never one of
    the measured configurations, so it gets no built-in figures ("" matches no entry)."""
    if reference is None:
        return None
    from emsweep.judge.score_maps import builtin_names

    return reference if reference in builtin_names() else ""


def judge_error(judge: JudgeSpec) -> JudgeError | None:
    """The spec's `judge.error`, else the built-in figures for this judge configuration, else None."""
    if judge.error is not None:
        e = judge.error
        return JudgeError(e.tp, e.positives, e.fp, e.negatives, e.source or "judge.error in the spec")
    if (carried := kind_of(judge).measured_error(judge)) is not None:
        return carried
    here = (judge.model, judge.scoring, judge.templates, _builtin_map_name(judge.score_map), judge.code_refusal)
    for entry in builtin_errors():
        if (entry["model"], entry["scoring"], entry["templates"], entry.get("score_map"),
                entry.get("code_refusal", "judge")) == here:
            return JudgeError(entry["tp"], entry["positives"], entry["fp"], entry["negatives"], entry["source"])
    return None
