"""Every module of emsweep imports on its own, in a fresh interpreter: no import cycle hides
behind the order in which other code happened to import things first (as `emsweep.sample` ->
`emsweep.judge` -> `emsweep.sample` once did, seen only by a benchmark process importing
`emsweep.sample` first)."""

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import emsweep


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(emsweep.__path__, "emsweep."))


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = _modules()
    assert {"emsweep.judge", "emsweep.judge.local", "emsweep.data", "emsweep.data.transforms", "emsweep.sample",
            "emsweep.spec", "emsweep.scoring"} <= set(modules)

    def first_import(module: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
        return module, proc.returncode, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(module, error) for module, code, error in pool.map(first_import, modules) if code != 0]
    assert not failed, failed


def test_the_import_graph_has_no_circle_even_through_imports_inside_functions():
    """The graph the before-stop hook draws (../shared/tools/import_cycles.py: every import,
    also those inside functions, counts): the file layer (files, remote) sits under the store,
    keys under the sweep driver and the preflight checks, and nothing imports back up."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tool = repo.parent / "shared" / "tools" / "import_cycles.py"
    proc = subprocess.run([sys.executable, str(tool), str(repo / "src")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
