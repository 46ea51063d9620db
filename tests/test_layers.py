"""Layers that only point down. Every module of `src/emsweep` has a layer in LAYERS, and every
import it makes (also inside functions; not those under `if TYPE_CHECKING:`) goes to its own
layer or one below. Together with the circle check (tests/test_imports.py) this keeps the
import graph a stack a newcomer can read from the bottom up:

    io       files and locations, secrets out of text, the output dir's lease
    records  the spec and what every stage shares (the EM rule, scoring, engines, models,
             progress records, W&B tracking, the leaf parts of data and judge)
    store    node outputs, the object-store mirror, the caches, the DAG executor
    stages   one module or package per job: data, finetune, sample, judge, analyze (and their
             keys, questions, figures)
    sweep    the sweep package (plan, resources, jobs, driver, results) and what runs or reads a
             whole sweep: preflight checks, planning, simulation, the report, doctor, submit
    cli      the command line
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ORDER = ["io", "records", "store", "stages", "sweep", "cli"]
LAYERS = {
    "io": ["emsweep", "emsweep.fileio", "emsweep.redact", "emsweep.lease"],
    "records": ["emsweep.spec", "emsweep.em", "emsweep.scoring", "emsweep.engine", "emsweep.models",
                "emsweep.misclassification", "emsweep.prediction_powered", "emsweep.vllm_cpu_lora", "emsweep.judged_files", "emsweep.progress",
                "emsweep.tracking", "emsweep.data.transforms", "emsweep.judge.templates", "emsweep.judge.score_maps",
                "emsweep.judge.static_labels", "emsweep.judge.calibration_data"],
    "store": ["emsweep.store", "emsweep.remote", "emsweep.sample_cache", "emsweep.dag"],
    "stages": ["emsweep.data", "emsweep.data.generate", "emsweep.data.judged", "emsweep.questions", "emsweep.keys",
               "emsweep.finetune", "emsweep.sample", "emsweep.judge", "emsweep.judge.agreement",
               "emsweep.judge.backends", "emsweep.judge.cache", "emsweep.judge.calibration", "emsweep.judge.errors",
               "emsweep.judge.http", "emsweep.judge.identity", "emsweep.judge.local", "emsweep.judge.panel",
               "emsweep.judge.reference", "emsweep.judge.kinds", "emsweep.judge.trained", "emsweep.judge.training",
               "emsweep.judge.audit", "emsweep.analyze", "emsweep.plots"],
    "sweep": ["emsweep.sweep", "emsweep.sweep.plan", "emsweep.sweep.manifest", "emsweep.sweep.migrate", "emsweep.sweep.resources", "emsweep.sweep.jobs",
              "emsweep.sweep.driver", "emsweep.sweep.results", "emsweep.checks", "emsweep.planning", "emsweep.workspace",
              "emsweep.simulate", "emsweep.report", "emsweep.doctor", "emsweep.submit"],
    "cli": ["emsweep.cli", "emsweep.cli.__main__", "emsweep.cli.common", "emsweep.cli.live", "emsweep.cli.run",
            "emsweep.cli.cluster", "emsweep.cli.data", "emsweep.cli.judge_eval", "emsweep.cli.finetune"],
}
LEVEL = {module: ORDER.index(layer) for layer, modules in LAYERS.items() for module in modules}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "emsweep").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The emsweep modules `path` imports anywhere in it (a name imported from a module counts
    as that module), leaving out imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.update({base} | {f"{base}.{alias.name}" for alias in node.names})
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("emsweep") and target != name:
            resolved.add(target)
    return resolved


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(LEVEL)) == [], "add new modules to LAYERS"
    assert sorted(set(LEVEL) - set(modules())) == [], "LAYERS names modules that no longer exist"


def test_imports_only_point_down():
    found = modules()
    upward = [f"{name} ({ORDER[LEVEL[name]]}) imports {target} ({ORDER[LEVEL[target]]})"
              for name, path in sorted(found.items()) for target in sorted(imports_of(path, name, set(found)))
              if target in LEVEL and name in LEVEL and LEVEL[target] > LEVEL[name]]
    assert upward == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import inside a function, or a relative one, is an import."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from emsweep.cli import app\n\nfrom . import spec\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from emsweep import report\n")
    assert imports_of(source, "emsweep.m", {"emsweep", "emsweep.cli", "emsweep.spec", "emsweep.report"}) == {
        "emsweep.cli", "emsweep.spec", "emsweep"}
