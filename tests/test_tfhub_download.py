"""`s4l import-tfhub gs://...` and https:// module locations, against a real HTTP server on loopback
that answers like Cloud Storage (JSON listing with sizes and CRC-32C, ranged GETs). Never the
internet: `S4L_GCS_ENDPOINT` points the gs:// mapping at the local server."""

from __future__ import annotations

import shutil

import pytest
from support.tfhub import FakeGCS, unpack_fixture

from s4l.errors import UserError

OBJ = "s4l-models/rotation"
DATA = "rotation/variables/variables.data-00000-of-00001"


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "a hostile module's payload ran"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A bucket `s4l-models` holding the rotation fixture as `rotation/`, served on loopback."""
    root = tmp_path / "gcs"
    unpack_fixture("rotation", root / "s4l-models")
    with FakeGCS(root) as gcs:
        monkeypatch.setenv("S4L_GCS_ENDPOINT", gcs.url)
        yield gcs


def test_gs_download_is_verified_cached_and_imported(tmp_path, bucket):
    from s4l.training.checkpoint import load_for_inference
    from s4l.training.tfhub.importer import import_tfhub

    cache = tmp_path / "cache"
    import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=cache, progress=False)
    gets = [p for p, _ in bucket.data_gets()]
    # the graph and ModuleDef first (checked before any weight is fetched), then the weights;
    # never the assets
    assert gets[:2] == [f"/{OBJ}/saved_model.pb", f"/{OBJ}/tfhub_module.pb"]
    assert sorted(gets[2:]) == [f"/{OBJ}/variables/variables.data-00000-of-00001",
                                f"/{OBJ}/variables/variables.index"]
    inf = load_for_inference(tmp_path / "a.pt")
    assert inf.spec.heads["rotation"] == 4
    assert (cache / "gs" / OBJ / "variables" / "variables.index").is_file()
    # second run: everything from the cache, verified against the listing's size and CRC-32C
    bucket.requests.clear()
    import_tfhub(f"gs://{OBJ}", tmp_path / "b.pt", cache=cache, progress=False)
    assert bucket.data_gets() == []
    assert (tmp_path / "a.pt").read_bytes() != b""


def test_interrupted_download_resumes_with_a_range_request(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    bucket.cut_next[DATA] = 1  # the first response of the data shard stops half way
    import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    data_gets = [(p, r) for p, r in bucket.data_gets() if p.endswith("data-00000-of-00001")]
    assert len(data_gets) == 2 and data_gets[0][1] is None
    assert data_gets[1][1] is not None and data_gets[1][1].startswith("bytes=")
    assert int(data_gets[1][1].split("=")[1].rstrip("-")) > 0


def test_partial_file_of_an_earlier_run_is_resumed(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    cache = tmp_path / "c"
    src = bucket.root / "s4l-models" / DATA
    part = cache / "gs" / OBJ / "variables" / "variables.data-00000-of-00001.partial"
    part.parent.mkdir(parents=True)
    part.write_bytes(src.read_bytes()[:1000])
    import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=cache, progress=False)
    assert ("/" + OBJ + "/variables/variables.data-00000-of-00001", "bytes=1000-") in bucket.requests
    assert not part.exists()


def test_corrupt_transfer_is_refused_and_nothing_written(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    bucket.crc_override[DATA] = 12345  # the listing's CRC-32C disagrees with the bytes served
    with pytest.raises(UserError, match="CRC-32C of the download differs"):
        import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert not (tmp_path / "a.pt").exists()
    assert not list((tmp_path / "c").rglob("variables.data-*"))


def test_missing_module_in_the_bucket(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    with pytest.raises(UserError, match="holds no variables/variables.index"):
        import_tfhub("gs://s4l-models/no_such_module", tmp_path / "a.pt", cache=tmp_path / "c",
                     progress=False)


def _plain(monkeypatch) -> None:
    """Make the loopback server's URLs plain module URLs (not the gs:// endpoint's, listed)."""
    monkeypatch.setenv("S4L_GCS_ENDPOINT", "https://storage.invalid")


def test_plain_module_url_downloads_index_then_shards(tmp_path, bucket, monkeypatch):
    """An https-style module folder URL (no listing): sizes from the server, bytes from the
    bundle's own checksums."""
    from s4l.training.tfhub.importer import import_tfhub

    _plain(monkeypatch)

    import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert (tmp_path / "a.pt").is_file()
    assert not any(p.startswith("/storage/") for p, _ in bucket.requests)  # no listing used
    gets = [p for p, _ in bucket.data_gets()]
    assert gets[:3] == [f"/{OBJ}/saved_model.pb", f"/{OBJ}/tfhub_module.pb",
                        f"/{OBJ}/variables/variables.index"]
    # a damaged shard on the server: the tensor checksums catch it
    shard = bucket.root / "s4l-models" / DATA
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "b.pt", cache=tmp_path / "c2",
                     progress=False)
    assert not (tmp_path / "b.pt").exists()


def test_plain_http_is_refused_off_loopback(tmp_path):
    from s4l.training.tfhub.importer import import_tfhub

    with pytest.raises(UserError, match="only https://"):
        import_tfhub("http://example.com/module", tmp_path / "a.pt", cache=tmp_path / "c")
    shutil.rmtree(tmp_path / "c", ignore_errors=True)


@pytest.mark.parametrize("where", ["gs://s4l-models/../../escape", "gs://s4l-models/a/./b"])
def test_location_that_would_leave_the_cache_is_refused(tmp_path, bucket, where):
    from s4l.training.tfhub.importer import import_tfhub

    with pytest.raises(UserError, match="not a plain module location"):
        import_tfhub(where, tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    with pytest.raises(UserError, match="not a plain module location"):
        import_tfhub(f"{bucket.url}/s4l-models/../../../escape", tmp_path / "a.pt",
                     cache=tmp_path / "c", progress=False)
    assert bucket.requests == [] and not (tmp_path / "escape").exists()


def test_unreachable_server_is_one_clear_error(tmp_path, monkeypatch):
    from support.net import free_port

    from s4l.training.tfhub.importer import import_tfhub

    monkeypatch.setenv("S4L_GCS_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(UserError, match="cannot list gs://s4l-models/rotation") as e:
        import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a.pt").exists()


# ----------------------------------------------------------------------------- hostile graphs


def _spliced_py_func(bucket) -> None:
    from support.tfhub import py_func_node, splice_graph

    pb = bucket.root / "s4l-models" / "rotation" / "saved_model.pb"
    pb.write_bytes(splice_graph(pb.read_bytes(), [py_func_node()]))


def test_gs_module_with_a_hostile_graph_is_refused_before_its_weights_download(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    _spliced_py_func(bucket)
    with pytest.raises(UserError, match="uses op 'PyFunc', which runs Python code") as e:
        import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert "\n" not in str(e.value) and "saved_model.pb" in str(e.value)
    assert not (tmp_path / "a.pt").exists()
    assert not any("/variables/" in p for p, _ in bucket.data_gets())


def test_plain_url_with_a_pickle_graph_is_refused(tmp_path, bucket, marker, monkeypatch):
    import pickle

    from support.hostile import Payload

    from s4l.training.tfhub.importer import import_tfhub

    _plain(monkeypatch)
    pb = bucket.root / "s4l-models" / "rotation" / "saved_model.pb"
    pb.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match="saved_model.pb does not parse as a SavedModel"):
        import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c",
                     progress=False)
    assert not (tmp_path / "a.pt").exists()
    assert not any("/variables/" in p for p, _ in bucket.data_gets())


def test_gs_module_without_a_graph_is_refused(tmp_path, bucket):
    from s4l.training.tfhub.importer import import_tfhub

    (bucket.root / "s4l-models" / "rotation" / "saved_model.pb").unlink()
    with pytest.raises(UserError, match="holds no saved_model.pb"):
        import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert bucket.data_gets() == []


def test_graph_over_the_limit_is_refused_from_the_listing_or_while_downloading(
        tmp_path, bucket, monkeypatch):
    import s4l.training.tfhub.source as source
    from s4l.training.tfhub.importer import import_tfhub

    monkeypatch.setattr(source, "MAX_GRAPH_BYTES", 1 << 20)  # the fixture's graph is ~1.3 MB
    with pytest.raises(UserError, match="saved_model.pb is \\d+ bytes, over the 1 MiB limit"):
        import_tfhub(f"gs://{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert bucket.data_gets() == []  # refused from the listing: nothing fetched
    _plain(monkeypatch)
    with pytest.raises(UserError, match="over the 1 MiB limit"):  # no listing: Content-Length
        import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "b.pt", cache=tmp_path / "c2",
                     progress=False)
    assert not list((tmp_path / "c2").rglob("saved_model.pb*"))
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_plain_url_without_a_module_def_imports(tmp_path, bucket, monkeypatch):
    """tfhub_module.pb is optional (a 404 means none); the graph is not."""
    from s4l.training.tfhub.importer import import_tfhub

    _plain(monkeypatch)
    (bucket.root / "s4l-models" / "rotation" / "tfhub_module.pb").unlink()
    import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert (tmp_path / "a.pt").is_file()
    (bucket.root / "s4l-models" / "rotation" / "saved_model.pb").unlink()
    with pytest.raises(UserError, match="saved_model.pb: HTTP 404"):
        import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "b.pt", cache=tmp_path / "c2",
                     progress=False)
