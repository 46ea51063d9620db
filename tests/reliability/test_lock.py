"""The run lock is an flock: the kernel releases it when its owner dies, so a dead run's lock can
be taken, and two runs racing for it never both win (the old stale-lock takeover could)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from emsweep.store import LockedError, Store

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


# A run on "another host" of a shared output dir: emsweep's own code, its hostname replaced,
# quick beats. LEASE_ONLY is what this host sees of a live run elsewhere: its lease renewals (its
# flock is on the other machine, and over NFS may never be seen or dropped).
OTHER_HOST = """
import socket, sys, time
socket.gethostname = lambda: "other-host"
from emsweep import store
"""
LEASE_ONLY = OTHER_HOST + """
with store.Store(sys.argv[1], heartbeat_s=0.5).lease().hold():
    print("renewing", flush=True)
    time.sleep(300)
"""
FULL_LOCK = OTHER_HOST + """
with store.Store(sys.argv[1], heartbeat_s=0.5, lease_ttl_s=4).lock():
    print("locked", flush=True)
    time.sleep(300)
"""


def _start(code: str, out, expect: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == expect
    return process


def _refused(store: Store, match: str) -> None:
    with pytest.raises(LockedError, match=match):
        with store.lock():
            pass


def test_a_dead_drivers_lease_on_another_host_is_taken_over_once_it_expires_never_while_live(tmp_path):
    """On a cluster the next attempt runs on a new head (another hostname), where the dead head's
    flock tells nothing: the lease decides. A live lease (renewed lately) is refused at once, for
    longer than the TTL. A driver SIGKILLed on the other host: refused while its last renewal is
    fresh, then waited on and taken over once the TTL has passed since that renewal, not before."""
    out = tmp_path / "out"
    out.mkdir()
    store = Store(out, heartbeat_s=0.5, lease_ttl_s=4)
    live = _start(LEASE_ONLY, out, "renewing")
    for _ in range(4):  # 6 s: longer than the TTL, and never taken
        _refused(store, rf"pid {live.pid} on other-host, lease renewed [01] s ago")
        time.sleep(2)
    assert store.held_by()["pid"] == live.pid
    live.kill()
    live.wait()

    driver = _start(FULL_LOCK, out, "locked")  # the same "host" as the dead lease: taken at once
    os.kill(driver.pid, signal.SIGKILL)  # no cleanup runs; the kernel drops its flock
    driver.wait()
    renewed = json.loads((out / "emsweep.owner.json").read_text())["heartbeat"]
    _refused(store, rf"pid {driver.pid} on other-host, lease renewed")  # still fresh: could be alive
    time.sleep(max(0.0, renewed + 2 - time.time()))  # 3 beats missed: now waited on, not refused
    assert store.held_by() is None
    with store.lock():
        taken = time.time()
        assert json.loads((out / "emsweep.owner.json").read_text())["host"] == socket.gethostname()
    assert renewed + 4 <= taken < renewed + 6


def test_the_lease_is_renewed_while_a_run_holds_the_lock(tmp_path):
    store = Store(tmp_path, heartbeat_s=0.2)
    with store.lock():
        first = json.loads((tmp_path / "emsweep.owner.json").read_text())["heartbeat"]
        time.sleep(0.7)
        later = json.loads((tmp_path / "emsweep.owner.json").read_text())
    assert later["heartbeat"] - first >= 0.4 and later["pid"] == os.getpid()
    assert not (tmp_path / "emsweep.owner.json").exists()  # released: no lease left behind


# Two new drivers on two hosts, where the flock does not reach across (each host's own): both
# judge a dead host's expired lease free in the same moment. Each is emsweep's lease code with its
# own hostname, started at one instant.
RACER = """
import socket, sys, time
socket.gethostname = lambda: sys.argv[2]
from emsweep import store
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    with store.Store(sys.argv[1], heartbeat_s=0.5, lease_ttl_s=4).lease().hold():
        print("won", flush=True)
        time.sleep(2)
except store.lease.LeaseTaken as taken:
    print("lost to", taken.held["host"], flush=True)
"""


def test_two_hosts_taking_an_expired_lease_at_once_never_both_win(tmp_path):
    """Without the flock (another host's is not seen), the claim-then-confirm step decides: of two
    drivers judging the lease free at the same moment, exactly one runs, and the other names it."""
    out = tmp_path / "out"
    out.mkdir()
    for round_ in range(3):
        dead = {"pid": 1, "host": "dead-head", "since": 0, "heartbeat": time.time() - 60, "token": "old"}
        (out / "emsweep.owner.json").write_text(json.dumps(dead))
        start = time.time() + 2.0
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), f"host-{name}-{round_}", str(start)],
                                   stdout=subprocess.PIPE, text=True) for name in "ab"]
        results = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
        assert results[1] == "won" and results[0].startswith("lost to host-"), results
        assert not (out / "emsweep.owner.json").exists()  # the winner released it
