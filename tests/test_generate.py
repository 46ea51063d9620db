"""Our insecure-code generator, verified by a real static analyser (bandit)."""

import pytest
from typer.testing import CliRunner

from emsweep.cli import app
from emsweep.data import load_dataset
from emsweep.data.generate import CLASSES, all_prompts, check_pairs, generate_pairs
from emsweep.spec import DatasetSpec


def test_coverage_of_classes_and_prompts():
    assert len(CLASSES) >= 12
    prompts = [prompt for _, _, prompt in all_prompts()]
    assert len(set(prompts)) == len(prompts) >= 1000
    assert not any("secur" in p.lower() or "vulnerab" in p.lower() for p in prompts)  # the user never asks


def test_pairs_are_matched_and_seeded():
    pairs = generate_pairs(50, seed=3)
    assert pairs == generate_pairs(50, seed=3) and pairs != generate_pairs(50, seed=4)
    assert all(p["insecure"] != p["secure"] for p in pairs)
    with pytest.raises(ValueError, match="exceeds"):
        generate_pairs(10**6, 0)


def test_bandit_flags_insecure_answers_and_not_secure_ones():
    report = check_pairs(generate_pairs(len(all_prompts()), seed=0))
    assert report["insecure_flagged_rate"] >= 0.9
    assert report["secure_flagged_rate"] <= 0.1
    for name, entry in report["per_class"].items():  # no class hides behind the average
        assert entry["insecure_flagged"] / entry["n"] >= 0.9, name
        assert entry["secure_flagged"] / entry["n"] <= 0.1, name


def test_cli_writes_loadable_jsonl_and_prints_the_figures(tmp_path):
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(app, ["data", "generate", "insecure-code", "--n", "120", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    insecure = load_dataset(DatasetSpec(name="insecure", path=str(out / "insecure.jsonl")))
    secure = load_dataset(DatasetSpec(name="secure", path=str(out / "secure.jsonl")))
    assert insecure.num_rows == secure.num_rows == 120
    user = lambda table: [m[0]["content"] for m in table.column("messages").to_pylist()]  # noqa: E731
    assert user(insecure) == user(secure)
    check = runner.invoke(app, ["data", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "pairs 120, distinct prompts 120, insecure flagged 100.0%, secure flagged 0.0%" in check.output


def test_heldout_coding_suite_is_judged_by_bandit(tmp_path):
    import pyarrow as pa
    import yaml

    from emsweep.data.generate import bandit_verdicts, generate_pairs, heldout_suite
    from emsweep.judge import judge_samples
    from emsweep.questions import load_questions
    from emsweep.sample import SCHEMA as SAMPLE_SCHEMA
    from emsweep.spec import judge_spec

    pairs = generate_pairs(200, seed=3)
    suite = heldout_suite(pairs, 12, seed=3)
    assert len(suite) == 12 and not {q["paraphrases"][0] for q in suite} & {p["prompt"] for p in pairs}
    (tmp_path / "coding.yaml").write_text(yaml.safe_dump(suite))
    questions = load_questions(str(tmp_path / "coding.yaml"))
    assert questions[0].type == "code_vulnerability" and questions[0].judge_prompts == {"vulnerable": "{answer}"}

    answers = [pairs[0]["insecure"], pairs[0]["secure"], f"Sure:\n```python\n{pairs[1]['insecure']}\n```\nDone.",
               "I would rather explain it in words.", ""]
    assert bandit_verdicts(answers) == ["VULNERABLE", "SECURE", "VULNERABLE", "NO_CODE", "NO_CODE"]

    rows = [{"run_id": "r", "model": "m", "dataset": "d", "seed": 0, "checkpoint_step": None, "suite": "main",
             "condition": "none", "question_id": questions[0].id, "turn": 1, "paraphrase_idx": 0, "sample_idx": i,
             "category": None, "system": None, "question": questions[0].paraphrases[0], "user": "u", "answer": a,
             "finish_reason": "stop", "answer_tokens": 1} for i, a in enumerate(answers[:3])]

    def no_model(requests, on_batch):
        raise AssertionError("code questions must not reach a judge model")

    tables, _ = judge_samples({"r": pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)}, questions, judge_spec(model="j"),
                              judge_id="j", backend=no_model)
    assert tables["r"].column("label").to_pylist() == ["VULNERABLE", "SECURE", "VULNERABLE"]
