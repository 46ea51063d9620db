"""Builds the embedded trained judge (`judge: {backend: trained, model: embedded:em-judged-lexical}`).

Fitted with a fixed seed on GPT-4o's scores in ../shared/em-judged/, less the answers that the
workflows use elsewhere: the judge panel's draws (else the panel, a check of the judge, is
in-sample) and the training-control datasets' rows (else a lexical judge could flag the positive
control by recognising the parroted text). Both are found by running the same code the sweep
runs (panel.panel_answers, data.load_dataset) on every workflow in workflows/, and recorded in
the judge's manifest.

    python scripts/build_trained_judge.py [--out DIR] [--reference DIR] [--heldout]

`make setup` runs it without --heldout (about a minute); the leave-one-file-out figures of this
recipe are measured by scripts/trained_judge_lofo.py (docs/judging.md, "A trained judge").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reserved_rows(workflows: list[Path], reference: Path) -> dict[str, list[int]]:
    """File name -> 1-based rows of `reference` that some workflow's panel or training control uses."""
    from emsweep.data import load_dataset
    from emsweep.judge import panel
    from emsweep.judged_files import read_judged_frame, reference_files
    from emsweep.questions import load_suite
    from emsweep.spec import load_spec

    paths = reference_files(reference, "--reference")
    names = {path.name for path in paths}
    by_stem = {path.stem: path for path in paths}
    frames = {}  # each reference file read once, whatever the number of panel answers drawn from it
    rows: dict[str, set[int]] = {}
    for workflow in workflows:
        spec = load_spec(workflow)
        for dataset in spec.datasets:
            if dataset.judged is not None:
                table = load_dataset(dataset)
                for name, line in zip(table.column("source_file").to_pylist(), table.column("source_line").to_pylist()):
                    if name in names:
                        rows.setdefault(name, set()).add(int(line))
        if spec.judge.panel is not None:
            questions = [q for suite in spec.eval.suites for q in load_suite(suite)]
            suite, question_ids = panel.em_suite_questions(questions)
            samples, drawn = panel.panel_answers(spec.judge.panel, question_ids, suite, spec.analysis)
            answers = samples.column("answer").to_pylist()
            for (file_stem, question_id), answer in zip(zip(drawn["reference_file"], drawn["question_id"]), answers):
                path = by_stem[file_stem]
                if path not in frames:
                    frames[path] = read_judged_frame(path)
                frame = frames[path]
                match = frame.index[(frame["question_id"] == question_id) & (frame["answer"] == answer)]
                rows.setdefault(path.name, set()).update(int(i) + 1 for i in match)
    return {name: sorted(found) for name, found in sorted(rows.items())}


MEASUREMENT = ROOT / "docs" / "measurements" / "trained_judge_lofo.json"


def copy_measured_figures(out: Path, manifest: dict) -> dict:
    """The leave-one-file-out figures of this recipe (scripts/trained_judge_lofo.py), into the
    manifest, when the measurement is of exactly what was built here: the same config, training
    files (by sha256) and excluded rows. Otherwise the judge has no held-out figures (and no
    built-in error), and the build says so."""
    import json

    from emsweep.judge import trained

    measured = json.loads(MEASUREMENT.read_text()) if MEASUREMENT.is_file() else {}
    recipe = measured.get("recipe", {})
    same = (recipe.get("config") == manifest["config"]
            and [(f["name"], f["sha256"], f["used"]) for f in recipe.get("training_files", [])]
            == [(f["name"], f["sha256"], f["used"]) for f in manifest["training_files"]]
            and recipe.get("excluded_rows") == manifest["excluded_rows"]["rows"])
    if not same:
        print(f"note: {MEASUREMENT.name} measures another recipe; this judge has no held-out figures "
              "(run scripts/trained_judge_lofo.py)")
        return manifest
    heldout = {**measured["natural"], "source": f"GPT-4o on ../shared/em-judged/, leave one model file out "
                                               f"({MEASUREMENT.relative_to(ROOT)}, {measured['date']})"}
    return trained.add_to_manifest(out, {"heldout": heldout})


def main(argv: list[str] | None = None) -> int:
    from emsweep.judge import trained, training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reference", type=Path,
                        default=Path(os.environ.get("EMSWEEP_REFERENCE", ROOT.parent / "shared" / "em-judged")))
    parser.add_argument("--heldout", action="store_true", help="also measure it leave one file out (minutes)")
    args = parser.parse_args(argv)
    out = args.out or trained.resolve_judge_dir(trained.EMBEDDED_PREFIX + trained.EMBEDDED_JUDGE)
    started = time.time()
    workflows = sorted((ROOT / "workflows").glob("*.yaml"))
    exclude = reserved_rows(workflows, args.reference)
    paths = sorted(p for p in args.reference.iterdir() if p.suffix == ".csv")
    manifest = training.train_judge(
        paths, out, trained.TrainConfig(), exclude=exclude, heldout=args.heldout,
        exclusion_reason=("answers the judge panels draw and the training-control datasets train on, in "
                          + ", ".join(p.name for p in workflows)))
    if not args.heldout:
        manifest = copy_measured_figures(out, manifest)
    print(f"built the trained judge at {out} in {time.time() - started:.0f} s: "
          f"{sum(f['used'] for f in manifest['training_files'])} answers of {len(paths)} files, "
          f"{manifest['excluded_rows']['count']} excluded; weights sha256 {manifest['weights_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
