"""Who runs a sweep's output dir across hosts: a lease record, renewed every few seconds.

The record ({pid, host, since, heartbeat, token}) lives beside the outputs: `emsweep.owner.json`
in a local or shared output dir (where `Store.lock` adds an flock for this host), and at the root
of an object-store output dir (`remote.py`), where no flock exists. A lease renewed within
`MISSED_BEATS` beats is a live run (refused at once); one not renewed for `ttl_s` belongs to a dead
run (taken over); in between it is waited on. A lease from this host is decided at once by the
caller's `same_host_dead` (the flock, or whether the pid still runs).

Taking a lease is claim-then-confirm, because no store here offers a compare-and-swap that all of
them share: write our record, wait `settle_s`, read it back. Two drivers that judged the lease free
at the same moment both write within milliseconds of that judgment; the last write stays, and
after the settle each reads the same record, so exactly one finds its own token and runs. This
holds wherever a read sees the last completed write (local disks, S3 and GCS since 2020/2021).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

# A run renews its lease every HEARTBEAT_S; one not renewed for TTL_S is dead. A lease renewed
# within MISSED_BEATS beats is certainly live. SETTLE_S: far longer than any driver's gap between
# judging a lease free and writing its claim (milliseconds), short enough to pay at every start.
HEARTBEAT_S = 10.0
TTL_S = 120.0
MISSED_BEATS = 3
SETTLE_S = 1.0


class LeaseLost(RuntimeError):
    """This run's lease was taken over while it ran (another run judged it dead): it must stop."""


class LeaseTaken(RuntimeError):
    """The lease is held by a live run: `held` is its record, `age` seconds since its renewal."""

    def __init__(self, held: dict | None, age: float | None):
        super().__init__(f"held by {describe(held, age)}")
        self.held, self.age = held, age


class LeaseFile(Protocol):
    """Where the record lives (remote.LocationFile: a local path or a store object)."""

    def read(self) -> str | None: ...
    def write(self, text: str) -> None: ...
    def delete(self) -> None: ...


def pid_is_dead(record: dict) -> bool:
    """For a record written on this host: its process is gone."""
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):
        return False  # another user's live process, or a record we cannot read: not ours to take
    return False


@dataclass
class Lease:
    file: LeaseFile
    same_host_dead: Callable[[dict], bool] = pid_is_dead
    heartbeat_s: float = HEARTBEAT_S
    ttl_s: float = TTL_S
    settle_s: float = SETTLE_S
    host: str = field(default_factory=socket.gethostname)

    def record(self) -> dict | None:
        text = self.file.read()
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None

    def state(self) -> tuple[str, dict | None, float]:
        """("free" | "live" | "expiring", the record, seconds since its renewal)."""
        held = self.record()
        if held is None or "heartbeat" not in held:
            return "free", held, 0.0
        if held.get("host") == self.host:
            return ("free" if self.same_host_dead(held) else "live"), held, 0.0
        age = time.time() - float(held["heartbeat"])
        if age >= self.ttl_s:
            return "free", held, age
        return ("live" if age < MISSED_BEATS * self.heartbeat_s else "expiring"), held, age

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Own the lease for the block, renewing it; raise LeaseTaken if a live run has it."""
        while (current := self.state())[0] != "free":
            state, held, age = current
            if state == "live":
                raise LeaseTaken(held, age)
            print(f"waiting for the lease of {describe(held)} (last renewed {age:.0f} s ago) to expire "
                  f"after {self.ttl_s:.0f} s", flush=True)
            time.sleep(min(self.heartbeat_s, self.ttl_s - age))
        mine = {"pid": os.getpid(), "host": self.host, "since": time.time(), "token": uuid.uuid4().hex}
        self._write(mine)
        time.sleep(self.settle_s)
        held = self.record()
        if held is None or held.get("token") != mine["token"]:
            raise LeaseTaken(held, 0.0)  # another driver claimed it in the same moment, and won
        renewer = _Renewer(self, mine)
        try:
            yield renewer
        finally:
            renewer.stop()
            if (self.record() or {}).get("token") == mine["token"]:
                self.file.delete()

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps({**record, "heartbeat": time.time()}))


class _Renewer:
    """Renews `mine` every beat until stopped, and stops for good if another run took it over
    (it judged this one dead: this process stalled past the TTL); `lost()` then says who has it,
    and the driver stops (dag.execute) rather than write into an output dir another run owns."""

    def __init__(self, lease: Lease, mine: dict):
        self.lease, self.mine, self.stopped = lease, mine, threading.Event()
        self.taken_by: dict | None = None
        self.thread = threading.Thread(target=self._run, name="emsweep-lease", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.lease.heartbeat_s):
            try:
                held = self.lease.record()
                if held is not None and held.get("token") != self.mine["token"]:
                    self.taken_by = held
                    print(f"warning: the output dir's lease was taken over by {describe(held)}; "
                          "this run no longer owns it and stops", flush=True)
                    return
                self.lease._write(self.mine)
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    def lost(self) -> str | None:
        """Who took the lease over, in words; None while this run holds it."""
        return None if self.taken_by is None else f"the output dir's lease was taken over by {describe(self.taken_by)}"

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def describe(held: dict | None, age: float | None = None) -> str:
    who = f"pid {held.get('pid', '?')} on {held.get('host', '?')}" if held else "an unknown process"
    return who + (f", lease renewed {age:.0f} s ago" if age is not None else "")
