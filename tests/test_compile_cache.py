"""engine.compile_cache: the first worker saves what torch.compile made; a later worker with the same
key, in a fresh process with an empty Inductor cache, loads it and compiles no graph."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from sdfleet.actors.compile_cache import CompileCache
from sdfleet.actors.engine import Engine
from sdfleet.actors.speed_ups import CompiledWarmUp
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.spec import EngineSpec, ModelSpec

OFF = dict(channels_last=False, fuse_qkv=False, uint8_on_device=False)

# A worker's engine, built as ShardGenerator builds it, in a process of its own; prints what its
# warm-up compiled (torch's Inductor counters), whether the cache served it, and one image's hash.
WORKER = """
import hashlib, json, sys
from torch._dynamo.utils import counters
from sdfleet.actors.engine import Engine
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.spec import EngineSpec, ModelSpec
model, cache = sys.argv[1], sys.argv[2]
shape = GenerationParams("", "", 0, 2, 7.5, 64, 64, None)
engine = Engine(ModelSpec(source=model, scheduler="EulerDiscreteScheduler"), cpu_threads=2, batch_size=1,
                options=EngineSpec(channels_last=False, fuse_qkv=False, uint8_on_device=False, compile="on",
                                   compile_cache=cache), warm_up=[shape])
compiled = dict(counters["inductor"])
(_, images, _), = engine.generate([GenerationParams("a lighthouse at night", "", 5, 2, 7.5, 64, 64, None)])
print(json.dumps({"cache": engine.compile_cache, "warm_up_s": engine.warm_up_seconds, "inductor": compiled,
                  "image": hashlib.sha256(images[0].tobytes()).hexdigest()}))
"""


def worker(tiny_model, cache: str, inductor_dir) -> dict:
    # A fresh Inductor cache folder per process: only engine.compile_cache can spare a compile.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(tiny_model), cache],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_worker_loads_the_first_ones_graphs_from_s3_and_compiles_none(
    tiny_model, s3, tmp_path
):
    cache = f"s3://{s3.bucket}/compile-cache"
    first = worker(tiny_model, cache, tmp_path / "inductor-first")
    assert (
        first["cache"] == "miss" and first["inductor"]["fxgraph_cache_miss"] >= 2
    )  # the UNet and the VAE decoder
    artifacts = s3.ls(f"{s3.bucket}/compile-cache", detail=True)
    assert len(artifacts) == 1 and artifacts[0]["size"] > 0

    second = worker(tiny_model, cache, tmp_path / "inductor-second")
    assert second["cache"] == "hit"
    # Inductor compiled no graph: every one it needed came from the artifact.
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"]["fxgraph_cache_hit"] == first["inductor"]["fxgraph_cache_miss"]
    assert second["image"] == first["image"]
    # Put-if-absent: the second worker wrote nothing over the first one's artifact.
    assert s3.ls(f"{s3.bucket}/compile-cache", detail=True, refresh=True) == artifacts
    print(
        f"warm-up: first worker {first['warm_up_s']:.1f}s (compiled), second {second['warm_up_s']:.1f}s (cache hit)"
    )


@pytest.fixture(scope="module")
def eager_engine(tiny_model):
    return Engine(
        ModelSpec(source=str(tiny_model), scheduler="EulerDiscreteScheduler"),
        cpu_threads=2,
        options=EngineSpec(**OFF, compile="off"),
        batch_size=4,
    )


def test_the_key_changes_with_every_shape_batch_and_option_that_changes_the_graphs(
    eager_engine, monkeypatch
):
    def shape(width=64, guidance=7.5):
        return GenerationParams("", "", 0, 2, guidance, width, 64, None)

    key = CompiledWarmUp(eager_engine).cache_key
    base = key([shape()])
    assert key([shape()]) == base  # stable
    assert key([shape(width=128)]) != base  # another size
    assert key([shape(guidance=1.0)]) != base  # CFG off: half the UNet's batch
    assert key([shape(), shape(width=128)]) != base  # one more shape
    assert (
        key([GenerationParams("another prompt", "x", 9, 50, 7.5, 64, 64, None)]) == base
    )  # not part of a graph
    monkeypatch.setattr(eager_engine, "batch_size", 8)
    assert key([shape()]) != base
    monkeypatch.setattr(eager_engine, "batch_size", 4)
    monkeypatch.setattr(eager_engine, "options", EngineSpec(**{**OFF, "channels_last": True}))
    assert key([shape()]) != base
    monkeypatch.setattr(eager_engine, "options", EngineSpec(**OFF, compile_cache="off"))
    assert key([shape()]) == base  # where artifacts are kept is not what they are


def test_a_key_nobody_saved_is_a_miss_in_the_node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path))
    cache = CompileCache("node")
    assert cache.storage.url() == str(tmp_path / "compile")
    assert cache.load(hashlib.sha256(b"nothing compiled this").hexdigest()[:32]) is False
    (tmp_path / "compile").mkdir()
    broken = "0" * 32
    (tmp_path / "compile" / CompileCache.artifact(broken)).write_bytes(b"not torch's artifacts")
    assert (
        cache.load(broken) is False
    )  # a foreign or truncated artifact: compile instead of failing
