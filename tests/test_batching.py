"""The batch-size policy alone: a fake pipeline call that runs out of memory at given sizes, and a
fake GPU whose memory grows linearly with the batch, instead of a pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdfleet.actors.batching import (
    AUTO_BATCH_CAP,
    AUTO_BATCH_MEMORY_SHARE,
    CPU_AUTO_BATCH,
    BatchSizer,
    SampleFailed,
)
from sdfleet.schemas.samples import GenerationParams, InputImage

GIB = 2**30


def text(seed, guidance=7.5, width=64):
    return GenerationParams("a prompt", "", seed, 2, guidance, width, 64, None)


def image_task(seed, side):
    image = InputImage(Image.new("RGB", (side, side)), f"sha-{side}")
    return GenerationParams("a", "", seed, 2, 7.5, None, None, None, strength=0.8, image=image)


class FakePipeline:
    """Records each call's seeds; runs out of memory for the batches `too_large` says."""

    def __init__(self, too_large=lambda batch: False):
        self.too_large = too_large
        self.calls: list[list[int]] = []
        self.firsts: list[GenerationParams] = []

    def __call__(self, batch):
        self.calls.append([p.seed for p in batch])
        self.firsts.append(batch[0])
        if self.too_large(batch):
            raise torch.OutOfMemoryError("injected")
        return [np.full((2, 2, 3), p.seed, np.uint8) for p in batch]

    @property
    def sizes(self):
        return [len(c) for c in self.calls]


def made(sizer, params, batch_size=None):
    """index -> what the sizer yielded for it, each index exactly once."""
    out = {}
    for indices, images, seconds in sizer.generate(params, batch_size):
        assert seconds >= 0 and len(indices) == len(images)
        assert not set(indices) & set(out)
        out.update(zip(indices, images))
    assert sorted(out) == list(range(len(params)))
    return out


def test_out_of_memory_halves_the_batch_and_the_smaller_size_sticks():
    pipe = FakePipeline(lambda batch: len(batch) > 3)
    sizer = BatchSizer(pipe, "text-to-image", on_gpu=False, batch_size=8)
    params = [text(seed) for seed in range(10)]
    out = made(sizer, params)
    assert pipe.sizes == [8, 4, 2, 2, 2, 2, 2]
    assert pipe.calls[2:4] == [[0, 1], [2, 3]]  # retried from the same sample, in plan order
    assert sizer.size == 2
    assert all(out[i][0, 0, 0] == i for i in range(10))
    # The next call starts at the smaller size: it never grows back.
    pipe.calls.clear()
    made(sizer, [text(seed) for seed in range(5)])
    assert pipe.sizes == [2, 2, 1]


def test_a_partial_last_batch_halves_from_its_own_length():
    pipe = FakePipeline(lambda batch: len(batch) == 3)
    sizer = BatchSizer(pipe, "text-to-image", on_gpu=False, batch_size=4)
    made(sizer, [text(seed) for seed in range(7)])
    assert pipe.sizes == [4, 3, 1, 1, 1] and sizer.size == 1


def test_groups_keep_plan_order_and_a_fixed_size_restarts_each_group():
    """An explicit batch_size starts every group at that size again, even after an OOM (as the
    engine always did); without it the next group starts at the halved size."""
    params = [text(0, guidance=3.0), text(1), text(2, guidance=3.0), text(3), text(4), text(5)]
    pipe = FakePipeline(lambda batch: batch[0].guidance_scale == 3.0 and len(batch) > 1)
    sizer = BatchSizer(pipe, "text-to-image", on_gpu=False, batch_size=8)
    made(sizer, params, batch_size=4)
    assert pipe.calls == [[0, 2], [0], [2], [1, 3, 4, 5]]
    assert sizer.size == 1  # the engine's own size still records the OOM

    pipe.calls.clear()
    sizer.size = 8
    made(sizer, params)
    assert pipe.calls == [[0, 2], [0], [2], [1], [3], [4], [5]]


def test_a_text_to_image_sample_that_runs_out_alone_raises():
    pipe = FakePipeline(lambda batch: True)
    sizer = BatchSizer(pipe, "text-to-image", on_gpu=False, batch_size=2)
    with pytest.raises(torch.OutOfMemoryError):
        made(sizer, [text(0), text(1)])
    assert pipe.sizes == [2, 1]


def test_an_image_too_large_alone_fails_alone_and_the_rest_are_made():
    pipe = FakePipeline(lambda batch: batch[0].image.size[0] > 32)
    sizer = BatchSizer(pipe, "upscale", on_gpu=False, batch_size=4)
    params = [image_task(0, 32), image_task(1, 48), image_task(2, 32), image_task(3, 48)]
    out = made(sizer, params)
    assert pipe.calls == [[0, 2], [1, 3], [1], [3]]
    for i in (1, 3):
        assert isinstance(out[i], SampleFailed)
        assert out[i].reason.startswith(
            "out of GPU memory for one upscale image at 192x192 from its 48x48 input"
        )
    assert out[0].shape == out[2].shape == (2, 2, 3)


def test_halve_after_a_compile_warm_up_runs_out_stops_at_one():
    sizer = BatchSizer(FakePipeline(), "text-to-image", on_gpu=False, batch_size=4)
    assert sizer.halve() and sizer.size == 2
    assert sizer.halve() and sizer.size == 1
    assert not sizer.halve() and sizer.size == 1


class FakeGpu:
    """torch.cuda's memory calls over a GPU where a call takes `fixed` + `per_image` per image
    (times the image's pixels over 64², so a larger input needs more)."""

    def __init__(self, monkeypatch, free, fixed=2 * GIB, per_image=1 * GIB):
        self.free, self.fixed, self.per_image, self.peak = free, fixed, per_image, 0
        for name, fn in {
            "synchronize": lambda: None,
            "empty_cache": lambda: None,
            "memory_allocated": lambda: 0,
            "reset_peak_memory_stats": self.reset,
            "max_memory_allocated": lambda: self.peak,
            "mem_get_info": lambda: (self.free, 80 * GIB),
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def reset(self):
        self.peak = 0

    def pipeline(self, too_large=lambda batch: False):
        fake = FakePipeline(too_large)

        def call(batch):
            side = batch[0].image.size[0] if batch[0].image else batch[0].width
            self.peak = self.fixed + len(batch) * self.per_image * (side / 64) ** 2
            return fake(batch)

        call.fake = fake
        return call


def test_auto_fits_the_gpu_at_the_sweeps_largest_shape_up_to_the_cap(monkeypatch):
    gpu = FakeGpu(monkeypatch, free=20 * GIB)
    call = gpu.pipeline()
    sweep = [text(0, width=64), text(0, width=128), text(0, guidance=1.0, width=128)]
    sizer = BatchSizer(call, "text-to-image", on_gpu=True, batch_size="auto", sweep=sweep)
    # Measured at batch 1 and 2 of the largest size with CFG, one step long, as a probe.
    assert call.fake.sizes == [1, 2]
    for probe in call.fake.firsts:
        assert (probe.width, probe.guidance_scale, probe.num_inference_steps) == (128, 7.5, 1)
        assert (probe.prompt, probe.seed) == ("memory probe", 0)
    # 4 GiB per image at 128², 2 GiB fixed: (16 GiB - 2 GiB) // 4 GiB.
    assert sizer.size == int((20 * GIB * AUTO_BATCH_MEMORY_SHARE - 2 * GIB) // (4 * GIB)) == 3

    big = BatchSizer(
        FakeGpu(monkeypatch, free=10_000 * GIB).pipeline(),
        "text-to-image",
        on_gpu=True,
        batch_size="auto",
        sweep=sweep,
    )
    assert big.size == AUTO_BATCH_CAP
    cpu = BatchSizer(FakePipeline(), "text-to-image", on_gpu=False, batch_size="auto", sweep=sweep)
    assert cpu.size == CPU_AUTO_BATCH


def test_auto_probes_a_t5_sweep_at_its_longest_text(monkeypatch):
    """A swept max_sequence_length: the probe is the longest T5 length at the largest size (the
    text tokens join the image tokens in a T5 family's transformer)."""
    import dataclasses

    call = FakeGpu(monkeypatch, free=20 * GIB).pipeline()
    sweep = [
        dataclasses.replace(text(0, width=w), max_sequence_length=n)
        for w in (64, 128)
        for n in (77, 512, 256)
    ]
    BatchSizer(call, "text-to-image", on_gpu=True, batch_size="auto", sweep=sweep)
    assert {(p.width, p.max_sequence_length) for p in call.fake.firsts} == {(128, 512)}


def test_auto_measures_each_new_input_size_once_and_keeps_its_halving(monkeypatch):
    """Image tasks on a GPU: the sweep is probed at the native input size, then each input size
    is measured when it first arrives; an OOM halves that size's batch only."""
    gpu = FakeGpu(monkeypatch, free=30 * GIB, fixed=0, per_image=1 * GIB)
    call = gpu.pipeline(lambda batch: batch[0].image.size[0] == 96 and len(batch) > 2)
    sweep = [GenerationParams("", "", 0, 2, 7.5, None, None, None, strength=0.8)]
    sizer = BatchSizer(
        call, "image-to-image", on_gpu=True, batch_size="auto", sweep=sweep, default_size=64
    )
    assert call.fake.sizes == [1, 2] and sizer.size == 24  # 1 GiB per 64² image
    call.fake.calls.clear()
    params = [image_task(10 + i, 96 if i % 2 else 64) for i in range(10)]
    made(sizer, params)
    # 64² inputs: a probe of batch 1 and 2, then one call of 5. 96²: 2.25 GiB per image fits 10,
    # so the probe, a call of 5 that runs out, then batches of 2.
    assert call.fake.sizes == [1, 2, 5, 1, 2, 5, 2, 2, 1]
    call.fake.calls.clear()
    made(sizer, params)
    assert call.fake.sizes == [5, 2, 2, 1]  # both sizes known now; 96² keeps its halved batch
