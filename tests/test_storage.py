import threading

import pytest

from sdfleet.actors.storage import Storage, cached_copy


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
    storage.put_file(src, "00001.tar")
    assert storage.read_bytes("00001.tar") == src.read_bytes()
    storage.write_bytes("00000.tar", b"replaced")
    assert storage.read_bytes("00000.tar") == b"replaced"
    if where == "local":
        # No temp files are left behind for a reader to trip over.
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
            "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]


def test_remote_folder_is_cached_once_and_verified(s3, tmp_path):
    for name, data in {"model_index.json": b"{}", "unet/w.safetensors": b"w" * 1000}.items():
        s3.pipe_file(f"{s3.bucket}/m/{name}", data)
    uri = f"s3://{s3.bucket}/m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_copy(uri, cache_root=str(tmp_path))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    folder = results[0]
    assert (folder / "unet" / "w.safetensors").read_bytes() == b"w" * 1000
    # A damaged copy (size differs from the manifest) is fetched again rather than trusted.
    (folder / "unet" / "w.safetensors").write_bytes(b"short")
    assert (cached_copy(uri, cache_root=str(tmp_path)) / "unet" / "w.safetensors").stat().st_size == 1000
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        cached_copy(f"s3://{s3.bucket}/nothing-here", cache_root=str(tmp_path))
