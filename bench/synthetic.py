"""Stand-ins for what this machine lacks, shared by bench/pipeline.py and bench/scale.py.

- `SyntheticEngine`: the real engine's interface and batching (it composes the engine's
  `BatchSizer` and `TokenCounter`), without a pipeline. Each pipeline call takes batch/rate
  seconds, sleeping for what is left after making its images (a CUDA call releases the GIL the
  same way), and returns real photographs: crops of the sample photos scikit-image ships, resized
  to the sample's size, so detectors and encoders see photo-like content. rate None: images at
  once (a null engine).
- `synthetic_worker(rate)`: `ShardGenerator` with that engine, for `JobRunner(worker=...)`. Every
  pipeline call appends the actor's own CPU time to a log, so a bench can tell the worker's CPU
  per image in steady state.
- `S3Server`: moto's S3 server in a process of its own (its CPU is not the worker's or the
  driver's).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdfleet.actors.batching import BatchSizer
from sdfleet.actors.engine import TokenCounter
from sdfleet.actors.generator import ShardGenerator
from sdfleet.schemas.tasks import TEXT_TO_IMAGE

# Colour photographs inside scikit-image's wheel (no download), of different content and detail.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)
# Crops per photo: 24 different images, so one encoded image is not simply repeated.
CROPS_PER_PHOTO = 4


def photographs(width: int, height: int) -> list[np.ndarray]:
    """Crops of the sample photos, resized to width x height, as uint8 HxWx3 arrays."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for name in PHOTOS:
        photo = Image.open(folder / name).convert("RGB")
        w, h = photo.size
        for i in range(CROPS_PER_PHOTO):
            # Crops of 100%, 85%, 70% and 55% of the photo's largest box of the target's aspect.
            scale = 1.0 - 0.15 * i
            cw = min(w, int(h * width / height)) * scale
            ch = cw * height / width
            left, top = (w - cw) * (i % 2) / 2, (h - ch) * ((i + 1) % 2) / 2
            box = (int(left), int(top), int(left + cw), int(top + ch))
            out.append(np.asarray(photo.resize((width, height), Image.LANCZOS, box=box)))
    return out


class SyntheticEngine:
    """The engine's interface and batching with its pipeline replaced by a clock: see the module's
    docstring. It composes what the engine batches and counts tokens with (BatchSizer,
    TokenCounter) around its own `call`."""

    rate: float | None = None  # images/s of the stand-in GPU; None: at once
    cpu_log: str | None = None  # folder for the per-process CPU log

    def __init__(
        self,
        model,
        device=None,
        cpu_threads=None,
        options=None,
        batch_size=8,
        warm_up=(),
        generation=None,
    ):
        from sdfleet.jobs.tiny_clip import clip_tokenizer

        # What runs on the pipeline's device beside it (curation's CLIP and heads) runs on the CPU
        # here.
        self.device = "cpu"
        self.dtype = model.dtype
        self.applied = []
        self.default_size = 512
        self.default_scheduler = model.scheduler or "EulerDiscreteScheduler"
        # No GPU memory to measure: "auto" is the engine's CPU batch size.
        task_name = getattr(model, "task", TEXT_TO_IMAGE)
        self.sizer = BatchSizer(self.call, task_name, on_gpu=False, batch_size=batch_size)
        # The tokenizer's cost (each shard counts its prompts' tokens) is the real one.
        self.tokens = TokenCounter(clip_tokenizer())
        self._photos: dict[tuple[int, int], list[np.ndarray]] = {}
        self._made = 0

    @property
    def batch_size(self) -> int:
        return self.sizer.size

    def generate(self, params, batch_size=None):
        return self.sizer.generate(params, batch_size)

    @property
    def max_tokens(self) -> int:
        return self.tokens.max_tokens

    def count_tokens(self, prompts) -> dict[str, int]:
        return self.tokens.count(prompts)

    def scheduler_name(self, params) -> str:
        return params.scheduler or self.default_scheduler

    def call(self, batch) -> list[np.ndarray]:
        first = batch[0]
        started = time.time()
        done_at = time.perf_counter() + (len(batch) / self.rate if self.rate else 0.0)
        size = (first.width, first.height)
        if size not in self._photos:
            self._photos[size] = photographs(*size)
        photos = self._photos[size]
        images = [photos[p.seed % len(photos)].copy() for p in batch]  # the copy to the host
        left = done_at - time.perf_counter()
        if left > 0:
            time.sleep(left)
        self._made += len(batch)
        if self.cpu_log:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with open(Path(self.cpu_log) / f"cpu-{os.getpid()}.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {
                            "started": started,
                            "ts": time.time(),
                            "cpu": usage.ru_utime + usage.ru_stime,
                            "images": self._made,
                        }
                    )
                    + "\n"
                )
        return images


def synthetic_worker(rate: float | None, cpu_log: str | None = None) -> type:
    """A ShardGenerator whose engine is a SyntheticEngine at `rate` images/s."""
    engine = type("SyntheticEngine", (SyntheticEngine,), {"rate": rate, "cpu_log": cpu_log})
    return type("SyntheticWorker", (ShardGenerator,), {"engine_class": engine})


def register_for_ray() -> None:
    """Ship this module's classes to Ray workers by value: a worker cannot import bench/."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class S3Server:
    """moto's S3 server over HTTP on loopback, in its own process; sets the AWS environment (dummy
    credentials, endpoint) for this process and every process it starts, Ray's workers included."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint,
                # nothing may ask the instance-metadata address for credentials
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def bucket(self, name: str):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(name)
        return fs

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
