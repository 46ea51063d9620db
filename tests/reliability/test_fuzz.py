"""Fuzzing the loaders: every malformed spec, dataset or question file ends in one clear error.

"Clear" means the loader's own error type (SpecError, DataError, QuestionError) whose message
names the file; never another exception with a traceback. Each test prints how many cases
hypothesis tried.
"""

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emsweep.data import DataError, read_chat_jsonl
from emsweep.questions import QuestionError, load_questions
from emsweep.spec import SpecError, load_spec, parse_spec

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)

VALID_SPEC = {
    "name": "fuzz",
    "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
    "datasets": [{"name": "d", "path": "data.jsonl", "transforms": [{"kind": "educational"}]}],
    "seeds": [0, 1],
    "finetune": {"learning_rate": 1e-4},
    "sampling": {"max_tokens": 16},
    "eval": {"questions": "q.yaml"},
    "judge": {"model": "m"},
}
VALID_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
VALID_QUESTION = {"id": "q1", "type": "free_form_judge_0_100", "paraphrases": ["Hello?"], "samples_per_paraphrase": 2,
                  "judge_prompts": {"aligned": "Q {question} A {answer}"}, "system": "Be brief."}


def paths(tree, prefix=()):
    """Every (path to a node) in a JSON-like tree."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from paths(value, prefix + (index,))


@st.composite
def mutated(draw, valid):
    """A valid document with one node replaced, deleted, or given an unknown sibling."""
    document = copy.deepcopy(valid)
    target = draw(st.sampled_from(list(paths(document))[1:]))
    parent = document
    for step in target[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[target[-1]] = draw(values)
    elif action == "delete":
        del parent[target[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(values)
    else:
        parent.append(draw(values))
    return document


class Counter:
    def __init__(self):
        self.tried, self.rejected = 0, 0


@pytest.fixture()
def report(capsys, request):
    counter = Counter()
    yield counter
    with capsys.disabled():
        print(f"\n{request.node.name}: {counter.tried} cases tried, {counter.rejected} rejected with a clear error")


@FUZZ
@given(document=mutated(VALID_SPEC) | values)
def test_spec_mutations(document, report, tmp_path_factory):
    report.tried += 1
    try:
        parse_spec(document, source="fuzz.yaml", base=Path("/tmp/fuzz"))
    except SpecError as err:
        report.rejected += 1
        assert str(err).startswith("fuzz.yaml") or "environment variable" in str(err)


@FUZZ
@given(text=st.text(max_size=200) | values.map(lambda v: yaml.safe_dump(v)))
def test_spec_files(text, report, tmp_path_factory):
    report.tried += 1
    path = tmp_path_factory.mktemp("spec") / "sweep.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as err:
        report.rejected += 1
        assert str(path) in str(err)


@FUZZ
@given(rows=st.lists(mutated(VALID_ROW).map(json.dumps) | st.text(max_size=40) | values.map(json.dumps), min_size=1, max_size=5))
def test_dataset_jsonl(rows, report, tmp_path_factory):
    report.tried += 1
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("\n".join(rows), encoding="utf-8")
    try:
        read_chat_jsonl(path)
    except DataError as err:
        report.rejected += 1
        # Every bad row is listed, one line each, each naming the file.
        assert all(line.startswith(str(path)) for line in str(err).splitlines())


@FUZZ
@given(document=st.lists(mutated(VALID_QUESTION), min_size=1, max_size=3) | values | st.text(max_size=100))
def test_question_yaml(document, report, tmp_path_factory):
    report.tried += 1
    path = tmp_path_factory.mktemp("questions") / "questions.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document), encoding="utf-8")
    try:
        load_questions(str(path))
    except QuestionError as err:
        report.rejected += 1
        assert str(err).startswith(str(path))
