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
    # only the weights travel: index + data shard, never the graph
    assert sorted(gets) == [f"/{OBJ}/variables/variables.data-00000-of-00001",
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


def test_plain_module_url_downloads_index_then_shards(tmp_path, bucket):
    """An https-style module folder URL (no listing): sizes from the server, bytes from the
    bundle's own checksums."""
    from s4l.training.tfhub.importer import import_tfhub

    import_tfhub(f"{bucket.url}/{OBJ}", tmp_path / "a.pt", cache=tmp_path / "c", progress=False)
    assert (tmp_path / "a.pt").is_file()
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
