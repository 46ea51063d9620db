"""Preflight: every input a spec names, checked before Ray or any engine starts.

`preflight(spec)` returns one line per problem, each naming the file, line or field: every
dataset (and backdoor clean file) read and validated row by row by the data stage's own code,
every question file parsed with its ids and templates, the models and the judge resolved, the
judge's API key variable and URL, the output dir writable, and the scoring checks below.
`emsweep run`, `resume` and `plan` run it; `emsweep check SPEC` runs only it.

Scoring checks need the models' tokenizers.

A score that cannot exceed 9 on a 0-100 scale is worse than an error: the sweep finishes, every
EM rate is NaN, and nothing says why. `first_token` scoring reads a number from the judge's first
token, which is only right when the tokenizer has one token per number 0..100 (GPT-4o); a local
judge (or a self-rating subject model) whose tokenizer spells numbers digit by digit is refused
here. Over HTTP the tokenizer is not visible; the judge stage warns instead (judge.digit_split_warning).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from emsweep.judge.kinds import kind_of
from emsweep.models import load_tokenizer, resolve_model_path
from emsweep.redact import redact
from emsweep.scoring import first_token_problem
from emsweep.spec import SweepSpec


def _resolved(reference: str, field: str, missing_ok: bool, problems: list[str]) -> str | None:
    """The path of a model reference, or None with the reason appended to `problems` (an unknown
    embedded name; one not fetched yet, unless `missing_ok`)."""
    try:
        return resolve_model_path(reference)
    except (FileNotFoundError, ValueError) as err:
        if not (missing_ok and isinstance(err, FileNotFoundError)):
            problems.append(f"{field}: {err}")
        return None


def scoring_problems(spec: SweepSpec, missing_ok: bool = False) -> list[str]:
    """One line per scoring setting of the spec that cannot produce 0-100 scores.

    `missing_ok`: an embedded model that is not fetched yet is skipped (`emsweep plan` needs no weights)."""
    problems = []
    wanted = []
    for field, view in judges(spec):
        if view.judge.scoring == "first_token" and (judge_model := kind_of(view.judge).tokenizer_model(view)):
            wanted.append((f"judge {view.judge.model}", judge_model, f"{field}.scoring"))
    if spec.eval.harm_perception.scoring == "first_token" and any(s.harm_perception for s in spec.eval.suites):
        wanted += [(f"model {m.name} (self-rated harm)", m.path, "eval.harm_perception.scoring") for m in spec.models]
    for who, reference, field in wanted:
        path = _resolved(reference, field, missing_ok, problems)
        # Not on this machine (a hub id on a cluster): the engine checks again when it starts.
        if path is None or not Path(path).is_dir():
            continue
        if problem := first_token_problem(load_tokenizer(path), who):
            problems.append(f"{field}: {problem}")
    return problems


def preflight(spec: SweepSpec, out: str | Path | None = None, *, local_models: bool = True,
              missing_ok: bool = False) -> list[str]:
    """Every problem with the spec's inputs, one line each (empty: good to go).

    `local_models`: the models and the judge must be on this machine (false for a cluster, where
    the engines check them). `missing_ok`: inputs that do not exist yet (an embedded model not
    fetched, data not generated) are fine: `plan` notes them (missing_inputs) instead."""
    problems = [*_dataset_problems(spec, missing_ok, out), *_question_problems(spec, missing_ok),
                *_judge_problems(spec, missing_ok)]
    if local_models:
        problems += _model_problems(spec, missing_ok)
    else:  # models may be fetched or downloaded later, but a judge nothing can resolve never runs
        problems += _unresolvable_judge(spec)
    if local_models or missing_ok:
        problems += scoring_problems(spec, missing_ok=missing_ok)
    if out is not None:
        problems += _output_problems(out)
    return problems


def missing_inputs(spec: SweepSpec) -> list[str]:
    """Local input files the spec names that do not exist (yet): `plan` notes them."""
    named = [(f"datasets.{i}.path", d.path) for i, d in enumerate(spec.datasets)]
    named += [(f"datasets.{i}.backdoor.clean_path", d.backdoor.clean_path)
              for i, d in enumerate(spec.datasets) if d.backdoor]
    named += [(f"eval.suites.{i}.questions", s.questions) for i, s in enumerate(spec.eval.suites)]
    notes = [f"{field}: {location} does not exist yet" for field, location in named if _is_missing(location)]
    # An API key can still be exported before the run; plan notes it (the kind's own preflight).
    return notes + [_as_field(problem, field) for field, view in judges(spec)
                    for problem in kind_of(view.judge).problems(view, missing_ok=False)]


def _is_missing(location: str) -> bool:
    return ("://" not in location or location.startswith("file://")) and not Path(
        location.removeprefix("file://")).exists()


def _dataset_problems(spec: SweepSpec, missing_ok: bool = False, out: str | Path | None = None) -> list[str]:
    from emsweep.data import DataError, load_dataset

    problems = []
    for index, dataset in enumerate(spec.datasets):
        if missing_ok and (_is_missing(dataset.path) or (dataset.backdoor and _is_missing(dataset.backdoor.clean_path))):
            continue
        if _data_node_done(dataset, out):
            continue  # validated when its data node was made, from these very bytes (the key hashes them)
        try:
            load_dataset(dataset)  # the data stage's own validation: every row, transforms included
        except (DataError, OSError, UnicodeDecodeError) as err:
            problems += [f"datasets.{index} ({dataset.name}): {line}" for line in str(err).splitlines()]
    return problems


def _data_node_done(dataset, out: str | Path | None) -> bool:
    """Whether a local output dir holds this dataset's data node, done: the node's key holds the
    dataset's spec and its files' content hashes, so a resumed sweep of thousands of nodes does
    not read every row of every dataset again."""
    from emsweep.keys import data_node_key
    from emsweep.fileio import is_remote
    from emsweep.store import Store

    if out is None or is_remote(str(out)) or _is_missing(dataset.path):
        return False
    try:
        return Store(Path(out)).is_done("data", dataset.name, data_node_key(dataset))
    except OSError:
        return False


def _question_problems(spec: SweepSpec, missing_ok: bool = False) -> list[str]:
    from emsweep.data import DataError
    from emsweep.questions import QuestionError, load_suite

    problems = []
    for index, suite in enumerate(spec.eval.suites):
        if missing_ok and _is_missing(suite.questions):
            continue
        try:
            load_suite(suite)
        except (QuestionError, DataError, OSError, UnicodeDecodeError) as err:
            problems.append(f"eval.suites.{index} ({suite.name}): {err}")
    return problems or _trained_on_evaluated(spec)


def _trained_on_evaluated(spec: SweepSpec) -> list[str]:
    """A dataset of judged answers must not hold answers to a question the sweep asks: its rate
    would then measure recall of the training answers, not a trait."""
    from emsweep.data.judged import matches
    from emsweep.questions import load_suite

    if not any(dataset.judged is not None for dataset in spec.datasets):
        return []
    # Suites not readable (yet) are _question_problems' to report or plan's to note.
    asked = sorted({q.id for suite in spec.eval.suites if not _is_missing(suite.questions)
                    for q in load_suite(suite)})
    problems = []
    for index, dataset in enumerate(spec.datasets):
        if dataset.judged is not None:
            leaked = [q for q in asked if matches(q, dataset.judged.question_ids)]
            if leaked:
                problems.append(f"datasets.{index} ({dataset.name}): judged.question_ids "
                                f"{list(dataset.judged.question_ids)} take answers to evaluated questions {leaked}")
    return problems


def _panel_problems(spec: SweepSpec) -> list[str]:
    """The judge panel draws from its reference files now, as every judge job will."""
    from emsweep.judge.panel import em_suite_questions, panel_answers
    from emsweep.questions import QuestionError, load_suite

    try:
        questions = [q for suite in spec.eval.suites for q in load_suite(suite)]
        suite, question_ids = em_suite_questions(questions)
        panel_answers(spec.judge.panel, question_ids, suite, spec.analysis)
    except (QuestionError, OSError):
        return []  # the question files' own problems are reported by _question_problems
    except ValueError as err:
        return [f"judge.panel: {err}" if not str(err).startswith("judge.panel") else str(err)]
    return []


def judges(spec: SweepSpec) -> list[tuple[str, SweepSpec]]:
    """Every judge a sweep runs, as (its field, the sweep as that judge runs it): the judge, and
    the audit judge if there is one (SweepSpec.audit_view)."""
    audited = spec.audit_view()
    return [("judge", spec)] + ([("judge.audit.judge", audited)] if audited is not None else [])


def _as_field(problem: str, field: str) -> str:
    """A judge kind's problem line ("judge.model: ...") under the judge's own field."""
    return field + problem[len("judge"):] if problem.startswith("judge.") else problem


def _judge_problems(spec: SweepSpec, missing_ok: bool = False) -> list[str]:
    problems = _panel_problems(spec) if spec.judge.panel is not None else []
    return problems + [_as_field(problem, field) for field, view in judges(spec)
                       for problem in kind_of(view.judge).problems(view, missing_ok)]


def _model_problems(spec: SweepSpec, missing_ok: bool) -> list[str]:
    wanted = [(f"models.{i}.path", m.path) for i, m in enumerate(spec.models)]
    wanted += [(f"{field}.model", judge_model) for field, view in judges(spec)
               if (judge_model := kind_of(view.judge).local_model(view))]
    problems = []
    for field, reference in wanted:
        if (path := _resolved(reference, field, missing_ok, problems)) is None:
            continue
        extra = " and is not the name of a model in `models`" if field.startswith("judge") else ""
        if Path(path).is_absolute():
            if not (Path(path) / "config.json").is_file():
                what = "is not a model folder (no config.json)" if Path(path).exists() else "does not exist"
                problems.append(f"{field}: {path} {what}{extra}")
        elif os.environ.get("HF_HUB_OFFLINE", "1") != "0" and not _in_hub_cache(path):
            # Engines load hub ids offline (HF_HUB_OFFLINE=1, emsweep's default): from the cache only.
            problems.append(f"{field}: {path!r} is not a local folder{extra}, and is not in the Hugging Face "
                            "cache (emsweep runs with HF_HUB_OFFLINE=1; download it first, or set HF_HUB_OFFLINE=0)")
    return problems


def _unresolvable_judge(spec: SweepSpec) -> list[str]:
    """A local judge that names no model of the sweep, no known embedded model, no hub id and no
    existing folder: no later step (fetch-model, a download, data generation) can make it exist."""
    problems: list[str] = []
    for field, view in judges(spec):
        judge_model = kind_of(view.judge).local_model(view)
        if judge_model is None:
            continue
        # An unknown embedded name is a problem; one not fetched yet is not (missing_ok).
        path = _resolved(judge_model, f"{field}.model", True, problems)
        if path is not None and Path(path).is_absolute() and not Path(path).exists():
            problems.append(f"{field}.model: {path} does not exist and is not the name of a model in `models`")
    return problems


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def nearest_existing_dir(path: Path) -> Path:
    """The dir itself or its nearest existing parent (what a run would create its dir in)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is not a directory")
    return existing


def probe_writable(directory: Path) -> None:
    """Write and remove a probe file (raises OSError if the dir takes none): a refused run
    creates nothing."""
    probe = directory / f".emsweep-write-probe-{uuid.uuid4().hex}"
    probe.write_text("probe")
    probe.unlink()


def _output_problems(out: str | Path) -> list[str]:
    from emsweep.remote import RemoteDir
    from emsweep.fileio import is_remote
    from emsweep.redact import redact_uri

    probe = f".emsweep-write-probe-{uuid.uuid4().hex}"
    try:
        if is_remote(out):
            remote = RemoteDir(str(out))
            remote.fs.create_dir(remote.root, recursive=True)
            with remote.fs.open_output_stream(f"{remote.root}/{probe}") as stream:
                stream.write(b"probe")
            remote.fs.delete_file(f"{remote.root}/{probe}")
        else:
            probe_writable(nearest_existing_dir(Path(out)))
    except Exception as err:  # any filesystem's refusal (permissions, bucket, credentials)
        where = redact_uri(str(out)) if is_remote(out) else str(out)
        reason = redact(str(err).replace(str(out), where)).strip().splitlines() or [""]
        return [f"output dir {where}: not writable ({type(err).__name__}: {reason[0]})"]
    return []
