"""kill -9 at random points: nothing half-written ever counts as done, nothing done is lost.

A writer process does what a sweep's stages do, through the real store: it writes Parquet
tables and a safetensors adapter into a tmp dir, commits the node, adds a judgment-cache part,
all under the run lock, skipping nodes already done. We SIGKILL it at random moments, check
every invariant, start it again, and repeat; finally it runs to completion.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

from emsweep.judge.cache import JudgmentCache
from emsweep.store import Store

NODES = 30
WRITER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from emsweep.judge import Judgment
    from emsweep.judge.cache import JudgmentCache
    from emsweep.store import Store

    store = Store(Path(sys.argv[1]))
    cache = JudgmentCache(store.root / "judge_cache")
    with store.lock():
        store.clean_tmp()
        for index in range(int(sys.argv[2])):
            name = f"node{index:03d}"
            if store.is_done("sample", name, "k"):
                continue
            started, tmp = time.time(), store.new_tmp_dir()
            rng = np.random.default_rng(index)
            table = pa.table({"row": np.arange(300_000), "value": rng.random(300_000),
                              "text": pa.array([f"answer {i}" for i in range(300_000)])})
            pq.write_table(table, tmp / "samples.parquet")
            (tmp / "adapter").mkdir()
            save_file({"lora_A": torch.randn(256, 2048), "lora_B": torch.randn(2048, 256)},
                      tmp / "adapter" / "adapter_model.safetensors")
            digests = {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(tmp.rglob("*")) if p.is_file()}
            store.commit("sample", name, "k", tmp, {"digests": digests, "seconds": time.time() - started})
            cache.put({f"{name}-{i}": Judgment(float(i), 1.0) for i in range(2000)}, judge_model="j")
    """
)


def check_invariants(root: Path) -> int:
    """Every done node is complete and intact; returns how many are done."""
    store = Store(root)
    done = 0
    for record_path in sorted((root / "nodes" / "sample").glob("*/_DONE.json")) if (root / "nodes").exists() else []:
        record = json.loads(record_path.read_text())
        node_dir = record_path.parent
        files = {str(p.relative_to(node_dir)) for p in node_dir.rglob("*") if p.is_file()} - {"_DONE.json"}
        assert files == set(record["digests"]), f"{node_dir}: files differ from its record"
        for name, digest in record["digests"].items():
            assert hashlib.sha256((node_dir / name).read_bytes()).hexdigest() == digest, f"{node_dir}/{name} corrupt"
        assert pq.read_table(node_dir / "samples.parquet").num_rows == 300_000
        assert store.is_done("sample", record["name"], "k")
        done += 1
    # The cache only ever shows whole parts: every node's part has its 2000 judgments, or none.
    found = JudgmentCache(root / "judge_cache").get({f"node{n:03d}-{i}" for n in range(NODES) for i in range(2000)})
    per_node = {}
    for key in found:
        per_node[key.rsplit("-", 1)[0]] = per_node.get(key.rsplit("-", 1)[0], 0) + 1
    assert set(per_node.values()) <= {2000}
    return done


def test_kill_9_at_random_points_never_corrupts_or_loses_work(tmp_path: Path, capsys):
    rng = random.Random(7)
    done_before, kills = 0, 0
    records: dict[str, float] = {}
    for trial in range(12):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(NODES)])
        time.sleep(rng.uniform(0.5, 4.0))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        done = check_invariants(tmp_path)
        assert done >= done_before, "a completed node was lost"
        # Nodes done in an earlier trial were never rewritten.
        for path, mtime in records.items():
            assert Path(path).stat().st_mtime_ns == mtime
        records = {str(p): p.stat().st_mtime_ns for p in tmp_path.glob("nodes/sample/*/_DONE.json")}
        done_before = done
    # The last writer takes the lock (the kernel dropped the killed writers' flocks) and finishes.
    subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(NODES)], check=True, timeout=600)
    assert check_invariants(tmp_path) == NODES
    assert Store(tmp_path).held_by() is None and not (tmp_path / "emsweep.owner.json").exists()
    # No half-written node is left behind (the folder itself is gone when the last writer had
    # nothing left to do: clean_tmp removes it and nothing new was started).
    assert not (tmp_path / "tmp").exists() or not list((tmp_path / "tmp").iterdir())
    with capsys.disabled():
        print(f"\nkill -9 crash test: {kills} kills at random points, {NODES} nodes intact at the end")
