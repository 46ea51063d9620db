import json
import os

import pytest

from emsweep.store import LockedError, Store, config_key, write_json_atomic


def test_config_key_is_stable_and_sensitive():
    key = config_key("finetune", {"lr": 1e-5, "seed": 0}, ["a", "b"])
    assert key == config_key("finetune", {"seed": 0, "lr": 1e-5}, ["b", "a"])  # order-free
    assert key != config_key("finetune", {"lr": 2e-5, "seed": 0}, ["a", "b"])
    assert key != config_key("finetune", {"lr": 1e-5, "seed": 0}, ["a", "c"])
    assert key != config_key("sample", {"lr": 1e-5, "seed": 0}, ["a", "b"])
    assert len(key) == 16


def test_commit_makes_a_node_done_only_at_the_end(tmp_path):
    store = Store(tmp_path)
    assert not store.is_done("data", "d", "k1")
    tmp = store.new_tmp_dir()
    (tmp / "data.parquet").write_bytes(b"x")
    # A crash here (files written, not committed) leaves the node not done.
    assert not store.is_done("data", "d", "k1")
    final = store.commit("data", "d", "k1", tmp, {"seconds": 1.0})
    assert store.is_done("data", "d", "k1")
    assert (final / "data.parquet").read_bytes() == b"x"
    assert store.record("data", "d", "k1")["seconds"] == 1.0


def test_directory_without_completion_record_is_not_done(tmp_path):
    store = Store(tmp_path)
    half = store.node_dir("sample", "r", "k")
    half.mkdir(parents=True)
    (half / "samples.parquet").write_bytes(b"partial")
    assert not store.is_done("sample", "r", "k")


def test_recommit_replaces_outputs_and_invalidate_clears_done(tmp_path):
    store = Store(tmp_path)
    for payload in (b"old", b"new"):
        tmp = store.new_tmp_dir()
        (tmp / "f").write_bytes(payload)
        final = store.commit("judge", "r", "k", tmp, {})
    assert (final / "f").read_bytes() == b"new"
    store.invalidate("judge", "r", "k")
    assert not store.is_done("judge", "r", "k")


def test_failures_are_recorded_and_cleared_on_success(tmp_path):
    store = Store(tmp_path)
    store.record_failure("finetune/m__d__s0", "boom")
    assert store.failure("finetune/m__d__s0")["error"] == "boom"
    tmp = store.new_tmp_dir()
    store.commit("finetune", "m__d__s0", "k", tmp, {})
    assert store.failure("finetune/m__d__s0") is None


def test_lock_refuses_a_second_run_and_names_its_owner(tmp_path):
    store = Store(tmp_path)
    assert store.held_by() is None
    with store.lock():
        assert store.held_by()["pid"] == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with store.lock():
                pass
    assert store.held_by() is None and not (tmp_path / "emsweep.owner.json").exists()
    # An owner record left behind by a killed run means nothing: only the flock counts.
    (tmp_path / "emsweep.owner.json").write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone"}))
    assert store.held_by() is None
    with store.lock():
        pass


def test_atomic_writes_create_the_folder_and_leave_no_temp_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "result.json"
    write_json_atomic(target, {"misaligned_rate": 0.1})
    assert json.loads(target.read_text()) == {"misaligned_rate": 0.1}
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_a_listing_that_races_the_dirs_creation_is_retried(tmp_path, monkeypatch):
    """Arrow's local listing raises FileNotFoundError ("Cannot list directory") when the dir appears
    between its opendir and its own existence check, as when a judge job lists the judgment cache
    while another job writes its first part there (seen once in a clean-clone rehearsal). files_at lists again."""
    import pyarrow.fs as pafs

    from emsweep import fileio

    (tmp_path / "part-1.parquet").write_bytes(b"x")
    real_filesystem_at, raised = fileio.filesystem_at, []

    class RacingFileSystem:  # the real local filesystem, whose first listing lost the race
        def __init__(self, fs):
            self.fs = fs

        def get_file_info(self, selector):
            if not raised:
                raised.append(selector.base_dir)
                raise FileNotFoundError(f"Cannot list directory '{selector.base_dir}'")
            return self.fs.get_file_info(selector)

    def racing_filesystem_at(location):
        fs, path = real_filesystem_at(location)
        assert isinstance(fs, pafs.LocalFileSystem)
        return RacingFileSystem(fs), path

    monkeypatch.setattr(fileio, "filesystem_at", racing_filesystem_at)
    _, files = fileio.files_at(str(tmp_path), suffix=".parquet")
    assert [os.path.basename(path) for path in files] == ["part-1.parquet"] and len(raised) == 1
    # A dir that is really missing is an empty listing, as before.
    assert fileio.files_at(str(tmp_path / "missing"))[1] == []
