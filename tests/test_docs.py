"""The documentation: the README is a front door, the site builds with `mkdocs build --strict`
(broken links and pages missing from the navigation fail), the spec reference covers every field,
every command the docs show is one a test (or CI's setup) runs, and the analysis example redraws
the headline from a sweep's exports with pandas and duckdb."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS))

# Each command the docs show, and the test (or setup script) that runs it.
RUN_BY = {
    "run": "tests/test_e2e.py",
    "resume": "tests/reliability/test_preflight.py",
    "status": "tests/test_e2e.py",
    "report": "tests/test_docs.py",
    "check": "tests/reliability/test_preflight.py",
    "plan": "tests/test_plan.py",
    "doctor": "tests/test_doctor.py",
    "submit": "tests/test_submit.py",
    "logs": "tests/test_submit.py",
    "stop": "tests/test_submit.py",
    "fetch-model": "scripts/setup.sh",
    "data generate": "tests/test_generate.py",
    "data check": "tests/test_generate.py",
    "judge-eval calibrate": "tests/test_calibration.py",
    "judge-eval agree": "tests/test_calibration.py",
    "analyze": "tests/test_reference.py",
    "judge-train": "tests/test_trained_judge.py",
    "migrate": "tests/test_node_keys.py",
    "finetune": "tests/test_finetune_zero3.py",
    "wandb-workspace": "tests/test_e2e.py",
}


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_the_site_builds_strict_and_the_spec_reference_has_every_field(tmp_path):
    from hooks import nested_models

    from emsweep.spec import SweepSpec

    result = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = (tmp_path / "site" / "spec-reference" / "index.html").read_text()
    models, queue = set(), [SweepSpec]
    while queue:
        model = queue.pop()
        if model not in models:
            models.add(model)
            queue.extend(m for field in model.model_fields.values() for m in nested_models(field.annotation))
    assert len(models) > 15
    for model in models:
        assert f"<code>{model.__name__}</code>" in reference, model
        for name in model.model_fields:
            assert f"<code>{name}</code>" in reference, (model.__name__, name)
    # The comment above a field is its description: a sample that must be there.
    assert "barrier: a model&rsquo;s sampling starts" in reference or "barrier: a model's sampling starts" in reference


def test_the_readme_is_a_front_door_one_click_from_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for command in ("make quickstart", "make test", "make setup"):
        assert command in readme
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", readme))
    assert linked == {page.name for page in _pages()} - {"index.md"}, "every docs page, linked from the README"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (REPO / image).is_file(), image


def _commands_shown() -> dict[str, list[str]]:
    """Every `emsweep <command>` in inline code or a code block of the README and the docs."""
    shown: dict[str, list[str]] = {}
    for path in [REPO / "README.md", *_pages()]:
        in_block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                in_block = not in_block
                continue
            spans = [line] if in_block else re.findall(r"`([^`]+)`", line)
            for span in spans:
                for match in re.finditer(r"(?:^|[\s$(])(?:\.venv/bin/)?emsweep ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", span):
                    command = match.group(1) + (f" {match.group(2)}" if match.group(1) in ("data", "judge-eval") else "")
                    shown.setdefault(command, []).append(f"{path.relative_to(REPO)}:{number}")
    return shown


def test_every_command_the_docs_show_is_run_by_a_test():
    from typer.main import get_command

    from emsweep.cli import app

    cli = get_command(app)
    shown = _commands_shown()
    assert {"run", "plan", "submit", "judge-eval calibrate"} <= set(shown)
    for command, where in shown.items():
        words = command.split()
        group = cli.commands.get(words[0])
        assert group is not None and (len(words) == 1 or words[1] in group.commands), f"not a command: {command} ({where[0]})"
        assert command in RUN_BY, f"`emsweep {command}` ({where[0]}) is run by no test"
        runner = (REPO / RUN_BY[command]).read_text()
        quoted = [f'"{word}"' for word in words] if RUN_BY[command].endswith(".py") else [command]
        assert all(q in runner for q in quoted), f"{RUN_BY[command]} does not run `emsweep {command}`"


def test_the_example_redraws_the_headline_from_the_exports_with_pandas_and_duckdb(tmp_path, shared_em):
    from report_fixture import build
    from typer.testing import CliRunner

    from emsweep.cli import app

    out = tmp_path / "sweep"
    build(out, shared_em)
    report = CliRunner().invoke(app, ["report", str(out), "--no-wandb"])
    assert report.exit_code == 0, report.output
    figure = tmp_path / "headline.png"
    result = subprocess.run([sys.executable, str(REPO / "examples" / "headline.py"), str(out), "--out", str(figure)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:2]): float(line.split()[2]) for line in result.stdout.splitlines()[1:]
            if len(line.split()) == 4}
    # An insecure run: 2 of 4 answers misaligned on one of 3 questions (1/6), 4 of 4 with the evil nudge (1/3).
    assert rows[("insecure", "none")] == pytest.approx(1 / 6, abs=1e-6) and rows[("insecure", "evil")] == pytest.approx(1 / 3, abs=1e-6)
    assert rows[("secure", "none")] == 0 and rows[("base", "evil")] == 0
    assert "pandas and duckdb agree on 6 conditions, 10 runs" in result.stdout
    assert figure.stat().st_size > 10_000


def test_every_repository_path_the_docs_name_exists():
    """Files and folders named in the README and the docs (`src/emsweep/scoring.py`,
    `tests/test_e2e.py`, ...) are there: moving code cannot leave the docs pointing at nothing."""
    pattern = re.compile(r"\b(?:src/emsweep|tests|bench|examples|workflows|cluster|manifests|scripts)/[A-Za-z0-9_./-]*[A-Za-z0-9_/]")
    missing = []
    for path in [REPO / "README.md", *_pages()]:
        for name in set(pattern.findall(path.read_text())):
            if not name.startswith("bench/results/") and not (REPO / name).exists():
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, missing


def test_the_judge_reference_table_and_builtin_errors_are_the_committed_measurement():
    """docs/judging.md's table against GPT-4o is rendered from docs/measurements/judge_reference.json
    (scripts/judge_reference_table.py --check-docs), and every built-in judge error is that file's
    report-file `counted` TPR and FPR for its configuration: no figure is typed by hand."""
    import json

    import yaml

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "judge_reference_table.py"), "--check-docs"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    measured = json.loads((REPO / "docs" / "measurements" / "judge_reference.json").read_text())["results"]
    errors = yaml.safe_load((REPO / "src" / "emsweep" / "judge" / "judge_errors.yaml").read_text())["judges"]
    assert len(errors) == sum(len(r["variants"]) for r in measured.values())
    for entry in errors:
        config = f"{entry['model'].removeprefix('embedded:')}-{entry['templates']}"
        (variant,) = [v for v in measured[config]["variants"].values()
                      if (v["code_refusal"], v["score_map"]) == (entry["code_refusal"], entry["score_map"])]
        counted = variant["figures"]["report"]["verdict"]["counted"]
        assert (entry["tp"], entry["positives"], entry["fp"], entry["negatives"]) == (
            counted["tpr"]["hits"], counted["tpr"]["n"], counted["fpr"]["hits"], counted["fpr"]["n"])


def test_the_trained_judges_table_is_the_committed_leave_one_file_out_measurement():
    """docs/judging.md's trained-judge table is rendered from docs/measurements/trained_judge_lofo.json,
    and that measurement is of the recipe the embedded judge is built with (its manifest carries
    the same figures as its built-in error)."""
    import json

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "trained_judge_lofo.py"), "--check-docs"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    from emsweep.judge import trained

    measured = json.loads((REPO / "docs" / "measurements" / "trained_judge_lofo.json").read_text())
    manifest = trained.read_manifest(trained.resolve_judge_dir("embedded:em-judged-lexical"))
    assert manifest["heldout"]["counted"] == measured["natural"]["counted"]
    assert measured["natural"]["n_answers"] == 10_800 and 0 < measured["natural"]["kappa"]["value"] < 1
