"""The run lock is an flock: the kernel releases it when its owner dies, so a dead run's lock can
be taken, and two runs racing for it never both win (the old stale-lock takeover could)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from emsweep.store import Store

CONTENDER = textwrap.dedent("""
    import sys, time
    from emsweep.store import LockedError, Store
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    try:
        with Store(sys.argv[1]).lock():
            print("won", flush=True)
            time.sleep(3)
    except LockedError as err:
        print("lost:", err, flush=True)
""")


def test_a_killed_owner_frees_the_lock_and_exactly_one_of_two_racers_wins(tmp_path):
    out = tmp_path / "out"
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom emsweep.store import Store\n"
                              "with Store(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(300)",
                              str(out)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "locked"
    assert Store(out).held_by()["pid"] == owner.pid
    os.kill(owner.pid, signal.SIGKILL)  # no cleanup runs: the owner record stays behind
    owner.wait()
    assert json.loads((out / "emsweep.owner.json").read_text())["pid"] == owner.pid
    assert Store(out).held_by() is None
    for _ in range(3):  # a few rounds, so a lucky ordering cannot hide a race
        start = time.time() + 1.5
        racers = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(out), str(start)],
                                   stdout=subprocess.PIPE, text=True) for _ in range(2)]
        results = [racer.communicate(timeout=60)[0].strip() for racer in racers]
        assert sorted(r.split(":")[0] for r in results) == ["lost", "won"], results
        assert "in use by another `emsweep run`" in next(r for r in results if r.startswith("lost"))
