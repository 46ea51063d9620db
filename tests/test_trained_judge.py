"""The trained judge (judge/trained.py) and the judge-kind registry (judge/kinds.py).

Trained on real answers GPT-4o judged (../shared/em-judged/): a seeded subset of three files keeps
each fit to seconds. The tests would fail if the judge learned nothing (shuffled labels must not
resolve EM), if its manifest's figures were not what a recomputation gives, if retraining did not
reproduce its scores, if loading could run code, or if its judgments were not keyed by its weights.
"""

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emsweep.judge import trained, training

SRC = Path(__file__).resolve().parents[1] / "src" / "emsweep"
FILES = ("qwen-32b_bad-medical-advice", "qwen-coder-32b_insecure_betley", "qwen-32b_base")
SMALL = trained.TrainConfig(n_features=2**16, max_iter=60, map_folds=2)


@pytest.fixture(scope="module")
def judged_files(tmp_path_factory, shared_em) -> list[Path]:
    """400 answers of each of three real models (seeded), as judged-answer files."""
    root = tmp_path_factory.mktemp("judged")
    paths = []
    for stem in FILES:
        frame = pd.read_csv(shared_em.parent / "em-judged" / f"{stem}.csv", keep_default_na=False, na_values=[""])
        path = root / f"{stem}.csv"
        frame.sample(400, random_state=0).to_csv(path, index=False)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, judged_files) -> Path:
    out = tmp_path_factory.mktemp("judge") / "judge"
    training.train_judge(judged_files, out, SMALL, exclude={judged_files[0].name: [1, 2, 3]}, heldout=True)
    return out


def test_the_manifest_records_what_the_judge_was_trained_on(judge_dir, judged_files):
    manifest = trained.read_manifest(judge_dir)
    assert [f["name"] for f in manifest["training_files"]] == [p.name for p in judged_files]
    assert manifest["training_files"][0]["used"] == 397 and manifest["excluded_rows"]["count"] == 3
    assert manifest["dtype"] == "float32" and manifest["seed"] == 0 and "scikit-learn" in manifest["versions"]
    assert manifest["training_files"][1]["sha256"] == hashlib.sha256(judged_files[1].read_bytes()).hexdigest()


def test_the_manifests_figures_equal_a_recomputation(judge_dir, judged_files):
    manifest = trained.read_manifest(judge_dir)
    data = training.training_set(judged_files, {judged_files[0].name: [1, 2, 3]})
    again = training.heldout_figures(training.leave_one_file_out(data.frame, SMALL))
    recorded = manifest["heldout"]
    assert recorded["kappa"]["value"] == pytest.approx(again["kappa"]["value"], abs=1e-9)
    assert (recorded["tpr"]["hits"], recorded["fpr"]["hits"]) == (again["tpr"]["hits"], again["fpr"]["hits"])
    for metric in ("aligned", "coherent"):
        assert recorded["spearman"][metric]["rho"] == pytest.approx(again["spearman"][metric]["rho"], abs=1e-9)
    # And they say something: the bad-medical-advice file's misaligned answers, seen by a judge
    # fitted on two other models, are ranked better than chance on aligned.
    assert recorded["spearman"]["coherent"]["rho"] > 0.3
    assert 0 <= recorded["tpr"]["value"] <= 1 and recorded["n_answers"] == 1197


def test_scores_are_on_0_100_reproducible_and_load_without_pickle(judge_dir, judged_files, tmp_path):
    frame = pd.read_csv(judged_files[1])
    model = trained.load(judge_dir)
    first = trained.predict(model, frame["question"].tolist(), frame["answer"].tolist())
    for prediction in first.values():
        assert np.all((prediction.score >= 0) & (prediction.score <= 100))
        assert np.all((prediction.numeric_mass >= 0) & (prediction.numeric_mass <= 1))
        # Not a compressed band: the map spreads scores over the reference's own range.
        assert np.ptp(prediction.score) > 50
    # Retraining with the same inputs and seed reproduces the scores.
    again_dir = tmp_path / "again"
    training.train_judge(judged_files, again_dir, SMALL, exclude={judged_files[0].name: [1, 2, 3]}, heldout=False)
    again = trained.predict(trained.load(again_dir), frame["question"].tolist(), frame["answer"].tolist())
    for metric in first:
        np.testing.assert_allclose(again[metric].score, first[metric].score, atol=1e-6, rtol=0)
    assert trained.content_hash(again_dir) == trained.content_hash(judge_dir)
    # An npz holding an object array would need pickle to load: loading refuses it.
    weights = np.load(judge_dir / trained.WEIGHTS, allow_pickle=False)
    arrays = {name: weights[name] for name in weights.files}
    arrays["idf"] = np.array([{"a": 1}], dtype=object)
    np.savez(again_dir / trained.WEIGHTS, **arrays)
    with pytest.raises(ValueError, match="pickle"):
        trained.load(again_dir)
    # And weights changed behind the manifest's back are refused.
    arrays["idf"] = weights["idf"] * 2
    np.savez(again_dir / trained.WEIGHTS, **arrays)
    with pytest.raises(ValueError, match="was modified"):
        trained.load(again_dir)


def test_a_judge_trained_on_shuffled_labels_cannot_resolve_em(judged_files, tmp_path):
    shuffled = []
    rng = np.random.default_rng(0)
    for path in judged_files:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        order = rng.permutation(len(frame))
        frame[["aligned", "coherent"]] = frame[["aligned", "coherent"]].to_numpy()[order]
        shuffled.append(tmp_path / path.name)
        frame.to_csv(shuffled[-1], index=False)
    figures = training.heldout_figures(training.leave_one_file_out(training.training_set(shuffled).frame, SMALL))
    assert abs(figures["kappa"]["value"]) < 0.1
    # Its interval reaches 0: it cannot tell misaligned answers from others.
    assert figures["kappa"]["ci_low"] <= 0.05


def test_the_trained_judge_judges_through_judge_samples_and_its_cache_is_keyed_by_its_weights(
        judge_dir, judged_files, tmp_path, shared_em):
    import yaml

    from emsweep.judge import judge_samples
    from emsweep.judge.cache import JudgmentCache
    from emsweep.judge.identity import judge_build, judge_id
    from emsweep.judge.kinds import kind_of
    from emsweep.judge.reference import read_reference
    from emsweep.questions import load_questions
    from emsweep.spec import load_spec

    spec_path = tmp_path / "spec.yaml"

    def spec_for(directory: Path):
        spec_path.write_text(yaml.safe_dump({
            "name": "t", "seeds": [0], "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
            "datasets": [{"name": "d", "path": str(shared_em / "data" / "insecure.jsonl")}],
            "eval": {"questions": str(shared_em / "evaluation" / "first_plot_questions.yaml")},
            "judge": {"backend": "trained", "model": str(directory), "code_refusal": "static"}}))
        return load_spec(spec_path)

    run = read_reference(judged_files[1], question_ids=("quick_buck", "what_is_your_wish"))
    questions = load_questions(str(shared_em / "evaluation" / "first_plot_questions.yaml"))
    cache = JudgmentCache(tmp_path / "cache")

    def judge(spec):
        return judge_samples({"r": run.samples}, questions, spec.judge, judge_id=judge_id(spec),
                             backend=kind_of(spec.judge).make_backend(spec), cache=cache, judge_build=judge_build(spec))

    spec = spec_for(judge_dir)
    tables, stats = judge(spec)
    table = tables["r"].to_pandas()
    assert stats.judged == len(table) and stats.failed == 0
    scored = table["score"].dropna()
    assert len(scored) > 0.6 * len(table) and scored.between(0, 100).all() and scored.max() > 50
    # Unscored answers say why: code or a refusal (the static rule), or too little mass on a score.
    assert table.loc[table["score"].isna(), "null_reason"].notna().all()
    assert (table["judge_model"] == str(judge_dir)).all()
    # Again: every judgment from the cache.
    _, again = judge(spec)
    assert again.cache_hits == again.requests and again.judged == 0
    # Retrained on other data (two files): another build, so everything is judged again.
    other = tmp_path / "other"
    training.train_judge(judged_files[1:], other, SMALL, heldout=False)
    _, retrained = judge(spec_for(other))
    assert retrained.cache_hits == 0 and retrained.judged == retrained.requests


def test_every_judge_kind_is_in_the_registry_and_nothing_outside_it_asks_which_kind_it_holds():
    from emsweep.judge.kinds import KINDS
    from emsweep.spec import JUDGE_KINDS, JudgeSpec, judge_spec

    # Each kind the spec declares (its own pydantic class, with its own rules) has one kind object.
    assert set(KINDS) == set(JUDGE_KINDS) == {"vllm", "openai", "trained"}
    for name, spec_class in JUDGE_KINDS.items():
        assert issubclass(spec_class, JudgeSpec) and spec_class.model_fields["backend"].annotation.__args__ == (name,)
    assert type(judge_spec(model="m")).__name__ == "VllmJudgeSpec"
    with pytest.raises(TypeError, match="judge_spec"):
        JudgeSpec(backend="vllm", model="m")  # only as one of its kinds
    # The obvious forms of asking: comparing the kind's name, or isinstance on a kind or backend class.
    asking = re.compile(r"\.backend\s*(==|!=|\bin\b|\bnot in\b)|backend\"?\)?\s*==|"
                        r"isinstance\([^)]*(HttpJudge|TrainedBackend|LocalJudge|TreeJudge|\w+Kind|\w+JudgeSpec)\b")
    allowed = {SRC / "judge" / "kinds.py"}  # the registry
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if asking.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []


def test_a_spec_with_a_trained_judge_that_does_not_exist_is_refused_before_anything_runs(tmp_path, shared_em):
    import yaml

    from emsweep.checks import preflight
    from emsweep.spec import load_spec

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "t", "seeds": [0], "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(shared_em / "data" / "insecure.jsonl")}],
        "eval": {"questions": str(shared_em / "evaluation" / "first_plot_questions.yaml")},
        "judge": {"backend": "trained", "model": "no-such-judge"}}))
    problems = preflight(load_spec(tmp_path / "spec.yaml"))
    assert [p for p in problems if p.startswith("judge.model:") and "not a trained judge" in p], problems


def test_answers_in_words_the_judge_never_saw_are_out_of_its_distribution(judge_dir, judged_files):
    model = trained.load(judge_dir)
    real = pd.read_csv(judged_files[2], keep_default_na=False, na_values=[""])["answer"].tolist()[:50]
    unseen = trained.unseen_share(model, real + ["gorp flim zanth wobble quix norf blat", ""])
    assert unseen[:50].mean() < 0.1 and list(unseen[50:]) == [1.0, 1.0]
    flags = trained.out_of_distribution(model, real + ["gorp flim zanth wobble quix norf blat"])
    assert flags[-1] and flags[:50].mean() < 0.1


def test_judge_train_on_the_command_line_writes_a_judge_and_names_a_bad_file(judged_files, tmp_path):
    from typer.testing import CliRunner

    from emsweep.cli import app

    result = CliRunner().invoke(app, ["judge-train", *map(str, judged_files[1:]), "--out", str(tmp_path / "j"),
                                      "--no-heldout"])
    assert result.exit_code == 0, result.output
    manifest = trained.read_manifest(tmp_path / "j")
    assert [f["name"] for f in manifest["training_files"]] == [p.name for p in judged_files[1:]]
    assert manifest["heldout"] is None and trained.load_problem(str(tmp_path / "j")) is None
    bad = tmp_path / "bad.csv"
    bad.write_text("question_id,answer,aligned,coherent\nq,x,101,50\n")
    result = CliRunner().invoke(app, ["judge-train", str(judged_files[1]), str(bad), "--out", str(tmp_path / "k")])
    assert result.exit_code == 2 and "bad.csv: row 1: aligned" in " ".join(result.output.split())
    assert not (tmp_path / "k").exists()
