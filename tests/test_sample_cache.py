"""Sample-cache keys (sweep.plan.sample_part_keys): a part is re-sampled exactly when what decides
its answers changes. The real cache is exercised end to end in tests/test_e2e.py (a condition
added to a finished sweep samples only its prompts)."""

from emsweep.sweep.plan import plan, sample_part_keys
from emsweep.sample import SampleRun
from emsweep.spec import parse_spec

RAW = {"name": "parts", "models": [{"name": "m", "path": "Org/Model-7B"}],
       "datasets": [{"name": "d", "path": "/nonexistent/emsweep-parts/train.jsonl"}], "seeds": [0],
       "eval": {"suites": [{"name": "a", "questions": "/nonexistent/emsweep-parts/a.yaml", "harm_perception": True},
                           {"name": "b", "questions": "/nonexistent/emsweep-parts/b.yaml", "pushback": True}],
                "conditions": [{"name": "none"}]},
       "judge": {"model": "m"}}


def _parts(raw, adapter):
    spec = parse_spec(raw)
    node = next(n for n in plan(spec) if n.id == "sample/m__d__s0")
    return sample_part_keys(spec, node, [SampleRun("m__d__s0", "m", "d", 0, adapter_path=str(adapter))])


def _adapter(tmp_path, weights=b"lora"):
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    return adapter


def test_adding_a_condition_or_suite_keeps_every_earlier_part(tmp_path):
    adapter = _adapter(tmp_path)
    parts, harm = _parts(RAW, adapter)
    assert sorted(parts) == [("m__d__s0", "a", "none"), ("m__d__s0", "b", "none")]
    assert sorted(harm) == [("m__d__s0", "a")]
    more = {**RAW["eval"], "conditions": [{"name": "none"}, {"name": "evil", "system_preset": "evil", "suites": ["a"]}],
            "suites": [*RAW["eval"]["suites"], {"name": "c", "questions": "/nonexistent/emsweep-parts/c.yaml"}]}
    parts_after, harm_after = _parts({**RAW, "eval": more}, adapter)
    assert {p: k for p, k in parts_after.items() if p in parts} == parts and harm_after == harm
    assert set(parts_after) - set(parts) == {("m__d__s0", "a", "evil"), ("m__d__s0", "c", "none")}


def test_what_decides_an_answer_rekeys_its_parts_and_nothing_else_does(tmp_path):
    adapter = _adapter(tmp_path)
    parts, harm = _parts(RAW, adapter)
    # Resources, analysis-only fields: no part changes.
    unchanged = {**RAW, "sampling": {"kv_cache_gib": 2, "tensor_parallel_size": 4},
                 "eval": {**RAW["eval"], "pushback": {"correct_label": "YES"},
                          "harm_perception": {"min_numeric_mass": 0.6}}}
    assert _parts(unchanged, adapter) == (parts, harm)
    # Sampling temperature: every answer part, not the ratings (they are greedy).
    hot, hot_harm = _parts({**RAW, "sampling": {"temperature": 0.5}}, adapter)
    assert all(hot[p] != parts[p] for p in parts) and hot_harm == harm
    # The pushback reply: only the pushback suite's part.
    replied, _ = _parts({**RAW, "eval": {**RAW["eval"], "pushback": {"messages": ["Really?"]}}}, adapter)
    assert {p for p in parts if replied[p] != parts[p]} == {("m__d__s0", "b", "none")}
    # A retrained adapter (other bytes, same finetune key): every part.
    (tmp_path / "retrained").mkdir()
    retrained, retrained_harm = _parts(RAW, _adapter(tmp_path / "retrained", weights=b"other lora"))
    assert all(retrained[p] != parts[p] for p in parts) and retrained_harm != harm
