"""Ctrl-C and SIGTERM on a real run: `emsweep run` stops within 10 s, cancelling its jobs, stopping
Ray and releasing the lock and its lease; nothing unfinished counts as done; a second Ctrl-C exits
without unwinding."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from emsweep.store import Store


def _start_run(tmp_path, shared_em):
    spec = {"name": "interrupt", "models": [{"name": "m", "path": "embedded:SmolLM2-135M-Instruct"}],
            "datasets": [{"name": "d", "path": str(shared_em / "data/insecure.jsonl"), "limit": 16}],
            "seeds": [0, 1], "finetune": {"max_seq_len": 256, "num_workers": 1, "zero_stage": 0},
            "sampling": {"max_tokens": 16, "kv_cache_gib": 1},
            "eval": {"questions": str(shared_em / "evaluation/first_plot_questions.yaml"),
                     "question_ids": ["what_is_your_wish"], "samples_per_paraphrase": 1},
            "judge": {"model": "embedded:Qwen2.5-Coder-1.5B-Instruct", "templates": "yes_no", "kv_cache_gib": 1},
            "wandb": {"mode": "disabled"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "emsweep.cli", "run", str(tmp_path / "spec.yaml"),
                                "--out", str(out), "--no-report"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    # Interrupt once the finetunes (or the base model's sampling) run: data done, jobs started.
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        started = list((out / "tmp" / "started").glob("*")) if (out / "tmp" / "started").exists() else []
        if len(started) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, process.stdout.read()
    time.sleep(3)  # let the started jobs get going
    return process, out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_stops_a_real_run_within_10_s_and_leaves_nothing_half_done(tmp_path, shared_em, signum):
    """SIGTERM too: what `ray job stop`, a deleted pod or a preempted node sends the driver; the
    lock and its lease must go with it, or the next attempt waits for the lease to expire."""
    process, out = _start_run(tmp_path, shared_em)
    sent = time.time()
    process.send_signal(signum)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 10 s after SIGINT:\n{process.stdout.read()}")
    stopped = time.time() - sent
    output = process.stdout.read()
    assert process.returncode == 128 + signum, output
    assert "interrupted" in output and "Traceback" not in output
    assert Store(out).held_by() is None and not (out / "emsweep.owner.json").exists()
    # Only the data node can have finished; every finetune/sample/judge node is not done.
    done = sorted(p.parent.parent.name + "/" + p.parent.name for p in out.glob("nodes/*/*/_DONE.json"))
    assert all(d.startswith("data/") for d in done), done
    assert not list(out.glob("nodes/*/*/adapter")) or done == []
    print(f"\n{signal.Signals(signum).name} -> exit in {stopped:.1f} s")


@pytest.mark.slow
def test_a_second_sigint_exits_without_unwinding(tmp_path, shared_em):
    process, out = _start_run(tmp_path, shared_em)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    sent = time.time()
    process.send_signal(signal.SIGINT)
    process.wait(timeout=10)
    elapsed = time.time() - sent
    # Without unwinding, once Python runs the handler: Ray defers SIGINT inside its own calls.
    assert process.returncode == 130 and elapsed < 5, (process.returncode, elapsed)
    assert Store(out).held_by() is None  # the kernel drops the flock even on os._exit
