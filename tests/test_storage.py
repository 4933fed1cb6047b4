import re
import threading

import pytest

from sdfleet.actors.model_cache import cached_copy
from sdfleet.actors.storage import Storage
from sdfleet.schemas.errors import StorageError


@pytest.mark.parametrize("where", ["local", "s3"])
def test_atomic_writes_and_listing(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        storage = Storage(f"s3://{s3.bucket}/out/")
    else:
        storage = Storage(str(tmp_path / "out"))
    storage.write_bytes("00000.tar", b"abc")
    storage.write_json("00000_stats.json", {"samples": 3})
    storage.write_json("00001_stats.json", {"samples": 4})
    assert storage.read_bytes("00000.tar") == b"abc"
    assert storage.list("*_stats.json") == ["00000_stats.json", "00001_stats.json"]
    assert storage.read_json("00001_stats.json") == {"samples": 4}
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 100_000)
    staged = storage.stage(src, "00001.tar", "writer-1", "application/x-tar")
    assert not storage.exists("00001.tar")  # staged files are invisible until published
    storage.publish("00001.tar", staged)
    assert storage.read_bytes("00001.tar") == src.read_bytes()
    storage.write_bytes("00000.tar", b"replaced")
    assert storage.read_bytes("00000.tar") == b"replaced"
    if where == "local":
        # No temp files are left behind for a reader to trip over.
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
            "00000.tar",
            "00000_stats.json",
            "00001.tar",
            "00001_stats.json",
        ]


def test_remote_folder_is_cached_once_and_verified(s3, tmp_path):
    for name, data in {"model_index.json": b"{}", "unet/w.safetensors": b"w" * 1000}.items():
        s3.pipe_file(f"{s3.bucket}/m/{name}", data)
    uri = f"s3://{s3.bucket}/m"
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_copy(uri, cache_root=str(tmp_path))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    folder = results[0]
    assert (folder / "unet" / "w.safetensors").read_bytes() == b"w" * 1000
    # A damaged copy (size differs from the manifest) is fetched again rather than trusted.
    (folder / "unet" / "w.safetensors").write_bytes(b"short")
    assert (
        cached_copy(uri, cache_root=str(tmp_path)) / "unet" / "w.safetensors"
    ).stat().st_size == 1000
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        cached_copy(f"s3://{s3.bucket}/nothing-here", cache_root=str(tmp_path))


@pytest.mark.parametrize("key", ["../../../escaped.txt", "unet/../../../../escaped.txt"])
def test_a_model_key_that_leaves_the_cache_folder_is_refused_and_nothing_is_written(
    key, s3, tmp_path
):
    """Whoever can write to a model bucket must not reach the worker's files: a key with `..` that
    would land outside the node cache fails the copy, naming the key, before anything is written."""
    s3.pipe_file(f"{s3.bucket}/models/m/model_index.json", b"{}")
    s3.pipe_file(f"{s3.bucket}/models/m/{key}", b"import os; os.system('touch /tmp/owned')")
    cache = tmp_path / "deep" / "cache"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(StorageError, match=f"object key '{re.escape(key)}' points outside"):
        cached_copy(f"s3://{s3.bucket}/models/m", cache_root=str(cache))
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert not any(p.name == "escaped.txt" for p in written), written
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "escaped.txt").exists()
