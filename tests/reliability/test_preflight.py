"""Preflight: every input a spec names is checked before Ray starts; all problems are listed, one
line each naming file:line or field, exit code 2, no traceback, within seconds."""

import os
import subprocess
import sys
import time

import yaml

CLI = [sys.executable, "-m", "emsweep.cli"]


def _emsweep(*args, env=None, timeout=120):
    started = time.time()
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "COLUMNS": "250", **(env or {})})
    return result, time.time() - started


def _broken_inputs(tmp_path, shared_em):
    good = (shared_em / "data/insecure.jsonl").read_text().splitlines()[:3]
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text("\n".join(good + ['{"messages": [{"role": "user", "content": "hi"', good[0]]) + "\n")
    no_role = tmp_path / "no_role.jsonl"
    no_role.write_text("\n".join(good + ['{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}']))
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text("\n".join(['{"messages": [{"role": "user", "content": "hi"}]}'] + good))
    return {
        "name": "broken",
        "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "a", "path": str(bad_json)}, {"name": "b", "path": str(no_role)},
                     {"name": "c", "path": str(shared_em / "data/insecure.jsonl"), "limit": 8,
                      "backdoor": {"clean_path": str(no_assistant)}}],
        "seeds": [0],
        "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml"),
                 "question_ids": ["what_is_your_wish", "no_such_question"]},
        "judge": {"backend": "openai", "model": "gpt-4o", "base_url": "ftp://judge.example/v1",
                  "api_key_env": "EMSWEEP_TEST_UNSET_KEY"},
        "wandb": {"mode": "disabled"},
    }


EXPECTED = [
    "datasets.0 (a): {tmp}/bad_json.jsonl:4: invalid JSON",
    "datasets.1 (b): {tmp}/no_role.jsonl:4: messages[0].role None is not one of",
    "datasets.2 (c): {tmp}/no_assistant.jsonl:1: the last message must be an assistant turn",
    "eval.suites.0 (main): ",
    "judge.base_url: 'ftp://judge.example/v1' must start with http:// or https://",
    "judge.api_key_env: the environment variable EMSWEEP_TEST_UNSET_KEY is not set",
]


def test_run_lists_every_broken_input_before_ray_starts(tmp_path, shared_em):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_broken_inputs(tmp_path, shared_em)))
    out = tmp_path / "out"
    result, seconds = _emsweep("run", str(tmp_path / "spec.yaml"), "--out", str(out))
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, output
    assert len(errors) == len(EXPECTED), output
    for line, expected in zip(errors, EXPECTED):
        assert line.startswith("error: " + expected.format(tmp=tmp_path)), (line, expected)
    assert "no_such_question" in errors[3]
    assert "Traceback" not in output and "sweep broken" not in output  # the executor never began
    assert seconds < 60 and not (out / "nodes").exists() and not (out / "spec.json").exists()
    # check runs only these checks; plan runs them too and never prints a traceback, but an unset
    # key variable is only a note there (a plan previews a run, maybe from another machine).
    for command, expected in (("check", errors), ("plan", [e for e in errors if "api_key_env" not in e])):
        again, _ = _emsweep(command, str(tmp_path / "spec.yaml"))
        assert again.returncode == 2 and "Traceback" not in again.stdout + again.stderr
        assert [line for line in again.stdout.splitlines() if line.startswith("error: ")] == expected


def test_a_judge_that_is_neither_a_model_of_the_spec_nor_a_folder_is_found_first(tmp_path, shared_em):
    spec = {"name": "nojudge", "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
            "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 4}], "seeds": [0],
            "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml")},
            "judge": {"model": "judges/missing-judge"}, "wandb": {"mode": "disabled"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result, _ = _emsweep("check", str(tmp_path / "spec.yaml"))
    assert result.returncode == 2
    assert ("error: judge.model: 'judges/missing-judge' is not a local folder and is not the name of a model in "
            "`models`, and is not in the Hugging Face cache") in result.stdout
    spec["judge"]["model"] = "./judges/missing-judge"  # a path, clearly
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result, _ = _emsweep("check", str(tmp_path / "spec.yaml"))
    assert result.returncode == 2
    assert f"error: judge.model: {tmp_path}/judges/missing-judge does not exist and is not the name of a model" \
        in result.stdout
    # plan previews a run without the weights, but a judge nothing can make exist is refused there
    # too: one line naming judge.model (a hub id may be downloaded later, and stays a note).
    for model, expected in (("./judges/missing-judge", f"judge.model: {tmp_path}/judges/missing-judge does not exist "
                                                       "and is not the name of a model in `models`"),
                            ("embedded:NoSuchModel", "judge.model: unknown embedded model 'NoSuchModel'")):
        spec["judge"]["model"] = model
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        result, _ = _emsweep("plan", str(tmp_path / "spec.yaml"))
        errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: " + expected), result.stdout
    spec["judge"]["model"] = "Org/judge-not-downloaded-yet"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert _emsweep("plan", str(tmp_path / "spec.yaml"))[0].returncode == 0


def test_unreadable_specs_name_the_file_and_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe\x89PNG")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: ok\nmodels: [a\n")
    for path, expected in ((binary, f"error: {binary}: not a text file"),
                           (broken, f"error: {broken}:3:1: invalid YAML: expected ',' or ']'")):
        for command in ("run", "plan", "check"):
            result, _ = _emsweep(command, str(path))
            assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
            assert result.stdout.strip().startswith(expected), result.stdout


def test_check_passes_the_quickstart_within_seconds(shared_em, tmp_path):
    result, seconds = _emsweep("check", "workflows/quickstart.yaml", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ok: workflows/quickstart.yaml: 2 datasets, 1 question suites, 1 models")
    assert seconds < 60
    assert list(tmp_path.iterdir()) == []  # the write probe is gone, and no output dir was made


def test_a_resumed_sweep_reads_no_dataset_whose_data_node_is_done_and_an_edited_one_again(tmp_path, shared_em,
                                                                                           monkeypatch):
    """A no-op resume of thousands of nodes must not read every row of every dataset: a data node
    done in the output dir was validated from the same bytes (its key hashes them). An edited
    file has another key, so it is read and its new bad row is reported."""
    from emsweep import data
    from emsweep.checks import preflight
    from emsweep.keys import data_node_key
    from emsweep.sweep.plan import plan
    from emsweep.spec import SweepSpec
    from emsweep.store import Store

    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join((shared_em / "data/insecure.jsonl").read_text().splitlines()[:4]) + "\n")
    spec = SweepSpec.model_validate({
        "name": "resume", "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
        "datasets": [{"name": "d", "path": str(source)}], "seeds": [0],
        "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml")}, "wandb": {"mode": "disabled"},
        "judge": {"backend": "openai", "model": "gpt-4o"}})
    (data_node,) = [node for node in plan(spec) if node.stage == "data"]
    assert data_node.key == data_node_key(spec.datasets[0])
    store = Store(tmp_path / "out")
    work = store.new_tmp_dir()
    (work / "data.parquet").write_bytes(b"")
    store.commit("data", data_node.name, data_node.key, work, {"seconds": 0.0})

    read = []
    real_load = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda dataset: read.append(dataset.name) or real_load(dataset))
    problems = [p for p in preflight(spec, tmp_path / "out", local_models=False) if p.startswith("datasets")]
    assert problems == [] and read == []
    assert preflight(spec, None, local_models=False) is not None and read == ["d"]  # no output dir: read

    with source.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}]}\n')
    read.clear()
    problems = [p for p in preflight(spec, tmp_path / "out", local_models=False) if p.startswith("datasets")]
    assert read == ["d"] and problems == [f"datasets.0 (d): {source}:5: the last message must be an assistant turn (nothing to train on)"]


def test_an_output_dir_from_another_version_is_a_one_line_error_naming_the_field(tmp_path):
    """A spec snapshot with a field this emsweep does not know (an older version wrote it):
    `status`, `report` and `resume` say which file and field, exit 2, and print no traceback."""
    import json

    from typer.testing import CliRunner

    from pathlib import Path

    from emsweep.cli import app
    from emsweep.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "workflows" / "quickstart.yaml")
    raw = json.loads(spec.model_dump_json())
    raw["analysis"]["bootstrap_resamples"] = 2000
    (tmp_path / "spec.json").write_text(json.dumps(raw))
    for command in (["status", str(tmp_path)], ["report", str(tmp_path), "--no-wandb"], ["resume", str(tmp_path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert f"{tmp_path / 'spec.json'}: analysis.bootstrap_resamples: Extra inputs are not permitted" in " ".join(
            result.output.split()), (command, result.output)
        assert "Traceback" not in result.output
