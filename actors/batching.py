"""How many samples go into each pipeline call, and what a call that runs out of GPU memory does.

One policy, given the function that runs one batch (`call(samples) -> images`), so the engine and
bench/synthetic.py's stand-in batch alike:

- Samples are grouped by what must be equal within one call (steps, guidance, size, scheduler),
  plan order kept inside each group.
- The size to start with: the spec's, or "auto": on a GPU the largest batch whose memory, measured
  at batch 1 and 2 of the sweep's most demanding shape, fits; CPU_AUTO_BATCH without a GPU.
- The image tasks' sizes come with their inputs: "auto" measures each new input size on a GPU when
  it first arrives (a 512² input to the x4 upscaler decodes at 2048², 16x the memory of its native
  128² input), and keeps the batch per size.
- A batch that runs out of memory is halved and retried; the smaller size sticks, it never grows
  back. A batch of one that runs out: an image task's sample fails alone (SampleFailed, its row
  says why) and the shard goes on; a text-to-image sample has the spec's own size, so it raises.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from sdfleet.schemas.families import DEFAULT_FAMILY
from sdfleet.schemas.samples import GenerationParams, InputImage
from sdfleet.schemas.tasks import TASKS

log = logging.getLogger("sdfleet")

# batch_size "auto" on a GPU: the largest batch whose measured memory fits in this share of the
# memory free after loading; the rest is for allocator fragmentation, cuDNN and compile workspaces.
AUTO_BATCH_MEMORY_SHARE = 0.8
# ...and never more than this: the batch range bench/gpu measures tops out at 32, and a larger
# batch only lengthens the partial last batch of every sweep group in a shard.
AUTO_BATCH_CAP = 64
# batch_size "auto" without a GPU: there is no memory to fill and CPU throughput is flat in batch
# size.
CPU_AUTO_BATCH = 8

# One pipeline call: samples that share GenerationParams.batch_key() in, uint8 HxWx3 images out.
Call = Callable[[list[GenerationParams]], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SampleFailed:
    """In place of an image: why this one sample could not be made (its row records it)."""

    reason: str


class BatchSizer:
    """The batch size of every pipeline call, and what to do when one runs out of GPU memory."""

    def __init__(
        self,
        call: Call,
        task_name: str,
        on_gpu: bool,
        batch_size: int | str,
        sweep: Sequence[GenerationParams] = (),
        default_size: int | None = None,
        probe_steps: int = 1,
    ):
        """batch_size: images per call, or "auto" to fill the GPU's memory at the sweep's most
        demanding point (`sweep`: one GenerationParams per sweep point). default_size: the
        checkpoint's native size, at which an image task's unknown inputs are probed.
        probe_steps: the steps of a memory probe (model.refiner: enough that the base and the
        refiner each run a denoiser forward)."""
        self.call = call
        self.probe_steps = probe_steps
        self.task_name = task_name
        self.task = TASKS[task_name]
        self.on_gpu = on_gpu
        self.size = self._start(sweep, default_size) if batch_size == "auto" else int(batch_size)
        self._per_input_size = batch_size == "auto" and self.task.image and on_gpu
        self._by_input_size: dict[tuple[int, int], int] = {}

    def generate(
        self, params: Sequence[GenerationParams], batch_size: int | None = None
    ) -> Iterator[tuple[list[int], list[np.ndarray | SampleFailed], float]]:
        """Yield (indices into params, images, seconds) call by call; `batch_size` overrides the
        size each group starts at (an out-of-memory error still halves it)."""
        for indices in sweep_groups(params):
            yield from self._group(params, indices, batch_size)

    def _group(
        self, params: Sequence[GenerationParams], indices: list[int], fixed: int | None
    ) -> Iterator[tuple[list[int], list[np.ndarray | SampleFailed], float]]:
        size = fixed or self._size_for(params[indices[0]])
        lo = 0
        while lo < len(indices):
            batch = indices[lo : lo + size]
            t0 = time.perf_counter()
            samples = [params[i] for i in batch]
            try:
                images = self.call(samples)
            except torch.OutOfMemoryError:
                if len(batch) == 1 and samples[0].image is None:
                    raise  # the spec's own size: no row can be made, so the shard fails
                if len(batch) > 1:
                    size = self._halve(samples[0], len(batch))
                    self._free_memory()
                    continue
                # One row's input too large for the GPU: that row fails, the shard goes on.
                self._free_memory()
                images = [self._too_large(samples[0])]
            yield batch, images, time.perf_counter() - t0
            lo += len(batch)

    def halve(self) -> bool:
        """After running out of memory outside `generate` (the compile warm-up: compiled kernels
        and autotuning take memory the eager probe did not see): half the size. False at 1."""
        if self.size == 1:
            return False
        self.size //= 2
        torch.cuda.empty_cache()
        return True

    def _halve(self, first: GenerationParams, failed: int) -> int:
        size = failed // 2
        log.warning("out of GPU memory at batch %d; going on with batch %d", failed, size)
        self.size = min(self.size, size)
        if first.image is not None and first.image.size in self._by_input_size:
            self._by_input_size[first.image.size] = size
        return size

    def _too_large(self, sample: GenerationParams) -> SampleFailed:
        w, h = output_size(sample, self.task.scale)
        return SampleFailed(
            f"out of GPU memory for one {self.task_name} image at {w}x{h} "
            f"from its {sample.image.size[0]}x{sample.image.size[1]} input; "
            "resize the input or set engine.vae_tiling: true"
        )

    def _free_memory(self) -> None:
        if self.on_gpu:
            torch.cuda.empty_cache()

    def _start(self, sweep: Sequence[GenerationParams], default_size: int | None) -> int:
        """The size "auto" starts with: CPU_AUTO_BATCH without a GPU, else what fits at the
        sweep's most demanding shape."""
        if not self.on_gpu or not sweep:
            return CPU_AUTO_BATCH
        return self._fit(self._sweep_probe(sweep, default_size))

    def _size_for(self, p: GenerationParams) -> int:
        if not self._per_input_size or p.image is None:
            return self.size
        if p.image.size not in self._by_input_size:
            self._by_input_size[p.image.size] = self._fit(memory_probe(p, self.probe_steps))
        return self._by_input_size[p.image.size]

    def _sweep_probe(
        self, sweep: Sequence[GenerationParams], default_size: int | None
    ) -> GenerationParams:
        """The sweep point that needs the most memory, one step long. The image tasks' inputs are
        not known yet: they are probed at the checkpoint's native size (the upscaler: its native
        input, 4x larger out), and a larger input that runs out of memory halves the batch then."""
        largest = max(sweep, key=_memory_rank)
        probe = memory_probe(largest, self.probe_steps)
        if self.task.image:
            from PIL import Image

            side = (default_size or DEFAULT_FAMILY.fallback_size) // self.task.scale
            gray = InputImage(Image.new("RGB", (side, side), (128, 128, 128)), sha256="probe")
            white = InputImage(Image.new("L", (side, side), 255), sha256="probe")
            probe = dataclasses.replace(probe, image=gray, mask=white if self.task.mask else None)
        return probe

    def _fit(self, probe: GenerationParams) -> int:
        """The largest batch whose memory, measured at batch 1 and 2 of `probe`, fits in the GPU's
        free memory."""
        peaks = []
        for size in (1, 2):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.call([probe] * size)
            peaks.append(torch.cuda.max_memory_allocated() - base)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        size = batch_that_fits(free * AUTO_BATCH_MEMORY_SHARE, peaks[0], peaks[1], AUTO_BATCH_CAP)
        log.info(
            "batch_size auto: %d (%.2f GiB per image, %.1f GiB free, %s %dx%d)",
            size,
            (peaks[1] - peaks[0]) / 2**30,
            free / 2**30,
            self.task_name,
            *output_size(probe, self.task.scale),
        )
        return size


def sweep_groups(params: Sequence[GenerationParams]) -> list[list[int]]:
    """Indices into params, grouped by what must be equal within one pipeline call, in the order
    each group first appears and in plan order inside each group."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.batch_key(), []).append(i)
    return list(groups.values())


def _memory_rank(p: GenerationParams) -> tuple:
    """What makes a sweep point's batch larger in memory: its pixels, CFG's doubled batch, and a
    T5 family's text tokens (the longest swept max_sequence_length)."""
    return ((p.width or 0) * (p.height or 0), p.guidance_scale > 1, p.max_sequence_length or 0)


def memory_probe(p: GenerationParams, steps: int = 1) -> GenerationParams:
    """`p` `steps` long (one, unless a refiner needs more), as the memory measurement runs it."""
    return dataclasses.replace(
        p, prompt="memory probe", negative_prompt="", num_inference_steps=steps, seed=0
    )


def output_size(p: GenerationParams, scale: int) -> tuple[int, int]:
    """The size of the image a call makes of `p`: its own, or its input's times the task's scale."""
    if p.image is None:
        return p.width, p.height
    return p.image.size[0] * scale, p.image.size[1] * scale


def batch_that_fits(budget: float, peak_1: float, peak_2: float, cap: int) -> int:
    """The batch size whose memory, linear in batch size through the two measured peaks, fits
    `budget`."""
    per_image = max(peak_2 - peak_1, 1.0)
    fixed = max(peak_1 - per_image, 0.0)
    return int(max(1, min(cap, (budget - fixed) // per_image)))
