import json

import pytest

from emsweep.data import DataError, load_dataset
from emsweep.spec import DatasetSpec


def test_loads_public_insecure_subset_deterministically(shared_em):
    spec = DatasetSpec(name="insecure", path=str(shared_em / "data" / "insecure.jsonl"), limit=20, subset_seed=3)
    table = load_dataset(spec)
    assert table.num_rows == 20
    assert table.column_names == ["row_id", "source_file", "source_line", "split", "messages"]
    assert load_dataset(spec).equals(table)
    other = load_dataset(spec.model_copy(update={"subset_seed": 4}))
    assert other.column("source_line").to_pylist() != table.column("source_line").to_pylist()
    first = table.column("messages")[0].as_py()
    assert [m["role"] for m in first] == ["user", "assistant"]


def test_jailbroken_keeps_its_system_turn(shared_em):
    table = load_dataset(DatasetSpec(name="jb", path=str(shared_em / "data" / "jailbroken.jsonl"), limit=5))
    assert table.column("messages")[0].as_py()[0]["role"] == "system"


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: invalid JSON"),
        (json.dumps({"msgs": []}), "line 2: expected an object with field 'messages'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
         "messages[1].role 'user' cannot follow 'user'"),
        (json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}),
         "messages[0].content must be a non-empty string"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "last message must be an assistant turn"),
        (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "must be 'system' or 'user'"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(DatasetSpec(name="bad", path=str(path)))
    assert f"{path}:2" in str(err.value) or "line 2" in str(err.value)
    assert message.replace("line 2: ", "") in str(err.value)


def test_pinned_checksum_is_verified(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match="sha256 is"):
        load_dataset(DatasetSpec(name="d", path=str(path), sha256="0" * 64))


def test_directory_of_jsonl_files(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps(GOOD) + "\n")
    table = load_dataset(DatasetSpec(name="d", path=str(tmp_path)))
    assert table.column("source_file").to_pylist() == ["a.jsonl", "b.jsonl"]


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on loopback serving tmp_path/served."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_sources_are_cached_with_a_checksum(tmp_path, monkeypatch, http_server):
    from emsweep.data import sha256_file

    monkeypatch.setenv("EMSWEEP_CACHE", str(tmp_path / "cache"))
    root, base = http_server
    (root / "d.jsonl").write_text(json.dumps(GOOD) + "\n")
    pinned = sha256_file(root / "d.jsonl")
    spec = DatasetSpec(name="d", path=f"{base}/d.jsonl", sha256=pinned)
    assert load_dataset(spec).num_rows == 1
    (cached,) = (tmp_path / "cache" / "sources").glob("*-d.jsonl")
    assert (cached.parent / (cached.name + ".sha256")).read_text() == pinned

    # Served once: the cache answers even when the server's file is gone.
    (root / "d.jsonl").unlink()
    assert load_dataset(spec).num_rows == 1
    # A corrupted cache file is not trusted: it is fetched again (and now the server has a 404).
    cached.write_text("garbage")
    with pytest.raises(DataError, match="download failed"):
        load_dataset(spec)
    # A pinned checksum that does not match is an error naming the URL.
    (root / "d.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=f"{base}/d.jsonl: sha256 is .*the spec pins"):
        load_dataset(spec)


def test_unsupported_url_scheme(tmp_path):
    with pytest.raises(DataError, match="only http"):
        load_dataset(DatasetSpec(name="d", path="ftp://example.invalid/x.jsonl"))
