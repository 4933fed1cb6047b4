"""The generation engine: one diffusers pipeline (text-to-image, or an image task of the SD2
family: image-to-image, inpaint, depth-to-image, upscale), loaded once, fed in batches.

It has no Ray in it, so a benchmark or a notebook can drive it directly:

    engine = Engine(ModelSpec(source="/models/sd2"), batch_size="auto")
    for indices, images, seconds in engine.generate(params): ...

How many samples go into each call is sdfleet.actors.batching's; the speed-ups and the compile
warm-up are sdfleet.actors.speed_ups'. What the driver checks of a checkpoint before any worker
starts is sdfleet.jobs.checkpoint's, so the driver never imports this module.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdfleet.actors.batching import CPU_AUTO_BATCH, BatchSizer, SampleFailed
from sdfleet.actors.components import (
    checkpoint_class,
    component_overrides,
    load_pretrained,
    vae_decode_dtype,
)
from sdfleet.actors.lora import Adapters
from sdfleet.actors.speed_ups import CompiledWarmUp, apply_speed_ups, wants_compile
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.families import DEFAULT_FAMILY, Family, family_of
from sdfleet.schemas.family_spec import MAX_SEQUENCE_LENGTH, call_inputs, per_sample, record
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.schedulers import unknown_scheduler
from sdfleet.schemas.tasks import TASKS, TEXT_TO_IMAGE

if TYPE_CHECKING:  # duck-typed at run time, so bench/gpu runs where pydantic is not installed
    from sdfleet.schemas.spec import EngineSpec, GenerationSpec, ModelSpec

log = logging.getLogger("sdfleet")

# Latents are drawn on the CPU so one sample can be regenerated alone on any device, bit for bit.
GENERATOR_DEVICE = "cpu"


class Engine:
    """Holds one pipeline on one device and generates batches of samples with per-sample seeds."""

    def __init__(
        self,
        model: ModelSpec,
        device: str | None = None,
        cpu_threads: int | None = None,
        options: EngineSpec | None = None,
        batch_size: int | str = CPU_AUTO_BATCH,
        warm_up: Sequence[GenerationParams] = (),
        generation: GenerationSpec | None = None,
    ):
        """batch_size: images per pipeline call, or "auto" to fill the GPU's memory.
        warm_up: one GenerationParams per sweep point; with torch.compile on, every shape they
        need is compiled here, once, instead of in the middle of the first shards.
        generation: the job's generation.*, for the family's own call inputs (T5's sequence
        length, skip-layer guidance, true CFG); None: the family's defaults."""
        # 1. Device and dtype. fp16 kernels are slow or missing on CPUs: fall back to float32 there.
        self.device, self.dtype = self._device_and_dtype(model, device, cpu_threads)
        self.model = model
        # The family whose pipeline class loads the checkpoint; once loaded, the checkpoint's own.
        self.family = DEFAULT_FAMILY
        self.variant = None  # the family's checkpoint kind, once loaded (FLUX.1-Fill-dev)
        self.task_name = getattr(model, "task", TEXT_TO_IMAGE)
        self.task = TASKS[self.task_name]

        # 2. The pipeline, and the size text-to-image makes when the spec gives none: the
        #    checkpoint's own.
        self.pipe = self._load(model)
        self.family = family = family_of(type(self.pipe).__name__) or DEFAULT_FAMILY
        self._read_the_checkpoint(family, generation)
        self.adapters = Adapters(self.pipe, model, family.denoiser, warm_up)  # model.loras

        # 3. Schedulers: the checkpoint's own, or the spec's class with its overrides; what the
        #    rows record of the family's own inputs (a flow-matching scheduler's shift among them).
        self._base_scheduler_config = self.pipe.scheduler.config
        self.default_scheduler = model.scheduler or type(self.pipe.scheduler).__name__
        self._schedulers = {}
        self.pipe.scheduler = self._scheduler(self.default_scheduler)
        self.family_record = self._family_record(model)

        # 4. Lossless speed-ups (engine.*), before the first call so compiled graphs see them.
        if options is None:
            from sdfleet.schemas.spec import EngineSpec

            options = EngineSpec()
        self.options = options
        self.applied = apply_speed_ups(self.pipe, options, family.fuse_transformer_qkv)
        # ... and model.refiner's pipeline beside the base, in the same dtype, with the same ones.
        self.refiner = None
        if getattr(model, "refiner", None) is not None:
            from sdfleet.actors.refiner import Refiner  # it imports this module

            # model.vae decodes the refiner's latents too: the refiner is the one that decodes.
            shared = {"vae": self.pipe.vae} if getattr(model, "vae", None) else {}
            self.refiner = Refiner(model, family, self.device, self.dtype, options, shared)

        # 5. The batch size, measured in eager mode (compiling a probe shape would be wasted);
        #    each measured call runs the refiner too.
        on_gpu = self.device.startswith("cuda")
        self.sizer = BatchSizer(
            self.call,
            self.task_name,
            on_gpu,
            batch_size,
            warm_up,
            self.default_size,
            probe_steps=self.refiner.probe_steps if self.refiner else 1,
        )

        # 6. torch.compile last, then its warm-up: every shape the job's sweep needs, once per
        #    actor. What it took, and whether engine.compile_cache spared it; None: no compile.
        self.warm_up_seconds: float | None = None
        self.compile_cache: str | None = None
        if wants_compile(options, self.device):
            done = CompiledWarmUp(self).run(warm_up)
            self.warm_up_seconds, self.compile_cache = done.seconds, done.cache
        log.info(
            "engine speed-ups: %s; batch size %d",
            ", ".join(self.applied) or "none",
            self.batch_size,
        )

    @staticmethod
    def _device_and_dtype(
        model: ModelSpec, device: str | None, cpu_threads: int | None
    ) -> tuple[str, str]:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu":
            return device, model.dtype
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        if model.dtype != "float32":
            log.info(
                "no GPU visible: running %s on the CPU in float32 instead of %s",
                model.source,
                model.dtype,
            )
        return device, "float32"

    def _read_the_checkpoint(self, family: Family, generation: GenerationSpec | None) -> None:
        """What the loaded checkpoint says of itself: its native size, its conditioning, the
        dtype its VAE decodes in, the family's own call inputs, and its tokenizers."""
        denoiser = getattr(self.pipe, family.denoiser, None)
        config = getattr(denoiser, "config", {})
        self.variant = family.variant(config)
        sample = config.get("sample_size")
        # The family's keywords every call passes (empty for SD2 and SDXL).
        self.call_inputs = call_inputs(family, config, generation)
        self.default_size = family.native_size(sample, getattr(self.pipe, "vae_scale_factor", 8))
        # A checkpoint conditioned on an aesthetic score (SDXL's refiner) gets diffusers' defaults,
        # passed explicitly as its rows record them.
        wants_aesthetics = self.pipe.config.get("requires_aesthetics_score", False)
        self.aesthetic_conditioning = family.aesthetic_inputs() if wants_aesthetics else {}
        # What the rows say the latents were decoded in (SDXL's VAE upcasts a float16 decode).
        self.vae_decode_dtype = vae_decode_dtype(
            family, getattr(self.pipe, "vae", None), self.dtype
        )
        # One counter per text encoder: each truncates the prompt at its own tokenizer's limit,
        # T5 at the call's sequence length.
        sequence = self.call_inputs.get(MAX_SEQUENCE_LENGTH)
        self.tokens = [
            TokenCounter(
                getattr(self.pipe, encoder.tokenizer, None),
                encoder.max_tokens,
                sequence if encoder.sequence else None,
            )
            for encoder in family.text_encoders
        ]

    def _family_record(self, model: ModelSpec) -> dict:
        """What the rows record of the family's own inputs (empty for SD2 and SDXL)."""
        # The scheduler's static shift as it runs; one that shifts by the image reads `mu` instead.
        config = self.pipe.scheduler.config
        shift = None if config.get("use_dynamic_shifting") else config.get("shift")
        return record(self.family, self.call_inputs, getattr(model, "drop_t5", False), shift)

    def _load(self, model: ModelSpec):
        """The task's pipeline on the device, loaded with safetensors only: pickle checkpoints can
        run code on load."""
        # transformers warns at import about optional vision backends the pipeline never uses.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        # A checkpoint a variant's own class runs (FLUX.1 Fill's FluxFillPipeline) loads as that
        # class: no auto pipeline maps to it.
        index_class = checkpoint_class(model.source, model.revision, model.storage_options)
        own = (family_of(index_class) or DEFAULT_FAMILY).own_pipeline(index_class, self.task_name)
        pipe = load_pretrained(
            getattr(
                diffusers, own or self.task.auto_pipeline or self.family.pipeline(self.task_name)
            ),
            "model.source",
            model.source,
            model.revision,
            model.storage_options,
            self.dtype,
            **component_overrides(model, self.dtype),  # model.vae, model.drop_t5
        )
        # Record what was loaded, not what was asked for: the rows' dtype column must say how the
        # pixels were made, and an argument the installed diffusers ignores would load float32.
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        loaded = str(denoiser.dtype).removeprefix("torch.") if denoiser is not None else self.dtype
        if loaded != self.dtype:
            log.warning(
                "%s loaded in %s, not the %s asked for; its rows record %s",
                model.source,
                loaded,
                self.dtype,
                loaded,
            )
            self.dtype = loaded
        if getattr(pipe, "safety_checker", None) is not None:
            # sdfleet scores images with its own detector (safety.*) and records the scores; the
            # SD1.x checker would silently black images out instead.
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(self.device)
        return pipe

    @property
    def batch_size(self) -> int:
        """Images per pipeline call now: the spec's or "auto"'s, less after running out of
        memory."""
        return self.sizer.size

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        self.sizer.size = size

    def _scheduler(self, name: str):
        if name not in self._schedulers:
            self._schedulers[name] = scheduler_of(
                name, self._base_scheduler_config, self.model.scheduler_config
            )
        return self._schedulers[name]

    def generate(
        self, params: Sequence[GenerationParams], batch_size: int | None = None
    ) -> Iterator[tuple[list[int], list[np.ndarray | SampleFailed], float]]:
        """Yield (indices into params, uint8 HxWx3 images, seconds) batch by batch. An image task's
        sample whose input is too large for the GPU even alone yields a SampleFailed instead.

        Samples are grouped by what must be equal within one pipeline call (steps, guidance,
        size, scheduler), keeping plan order inside each group. A batch that runs out of GPU
        memory is split in half and retried, and the engine keeps the smaller batch size.
        """
        return self.sizer.generate(params, batch_size)

    def call(self, batch: list[GenerationParams]) -> list[np.ndarray]:
        """One pipeline call on samples that share GenerationParams.batch_key(): uint8 HxWx3
        images."""
        first = batch[0]
        scheduler = first.scheduler or self.default_scheduler
        self.pipe.scheduler = self._scheduler(scheduler)
        self.adapters.set_scale(first.lora_scale)
        generators = [torch.Generator(GENERATOR_DEVICE).manual_seed(p.seed) for p in batch]
        on_device = self.options.uint8_on_device
        # 1. What every task takes, then the task's own inputs: the size (text-to-image), or the
        #    rows' images and masks, and strength or noise_level.
        task = self.task
        inputs = dict(
            prompt=[p.prompt for p in batch],
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="pt" if on_device else "np",
        )
        # Pre-flight refused a negative prompt where the pipeline takes none (FLUX.1 Fill's).
        if self.family.takes_negative_prompt(self.variant):
            inputs["negative_prompt"] = [p.negative_prompt for p in batch]
        if task.image:
            inputs["image"] = [p.image.pixels for p in batch]
            inputs.update(self.image_task_size(first))
        else:
            inputs.update(width=first.width, height=first.height)
        # Explicit, as the rows record it (empty for a family without micro-conditioning).
        inputs.update(self.size_conditioning(first), **self.aesthetic_conditioning)
        if task.mask:
            inputs["mask_image"] = [p.mask.pixels for p in batch]
        for key in task.parameters:
            inputs[key] = getattr(first, key)
        # The family's own (T5's sequence length, ...), at the batch's swept values.
        inputs.update(per_sample(self.call_inputs, first))
        # 2. The pipeline (with model.refiner: base, then refiner), then the images as uint8.
        with torch.inference_mode():
            if self.refiner is None:
                out = self.pipe(**inputs)
            else:
                out = self.refiner.refine(self.pipe, inputs, batch, scheduler)
            # The same float32 rounding as diffusers' numpy_to_pil, so plain diffusers reproduces
            # every pixel; on the device it moves a quarter of the bytes to the host.
            if on_device:
                images = (out.images.float() * 255).round().clamp(0, 255).to(torch.uint8)
                return list(images.permute(0, 2, 3, 1).cpu().numpy())
        return list((out.images * 255).round().astype(np.uint8))

    @property
    def max_tokens(self) -> int:
        """What the first text encoder reads."""
        return self.tokens[0].max_tokens

    def count_tokens(self, prompts: Sequence[str]) -> dict[str, PromptTokens]:
        """Each prompt's tokens as each of the family's text encoders sees them (T5 against the
        job's sequence length); a prompt that no tokenizer counts is left out."""
        counted = [counter.count(prompts) for counter in self.tokens]
        limits = tuple(counter.max_tokens for counter in self.tokens)
        sequence = next((i for i, c in enumerate(self.tokens) if c.limit is not None), None)
        return {
            p: PromptTokens(tuple(c.get(p) for c in counted), limits, sequence)
            for p in prompts
            if any(p in c for c in counted)
        }

    def size_conditioning(self, params: GenerationParams) -> dict[str, tuple[int, int]]:
        """The micro-conditioning `call` passes: a text-to-image sample's size, or an image task's
        input size as diffusers reads it (each side floored to the latent grid, the size it
        makes); empty for a family without it."""
        if self.task.image and params.image is not None:
            width, height = self.input_size(params)
        elif params.width is None:
            return {}
        else:
            width, height = params.width, params.height
        return self.family.size_conditioning_inputs(width, height)

    def input_size(self, params: GenerationParams) -> tuple[int, int]:
        """An image task's (width, height) as diffusers reads its input: each side floored to the
        latent grid."""
        grid = self.family.latent_grid
        width, height = (side - side % grid for side in params.image.size)
        return width, height

    def image_task_size(self, params: GenerationParams) -> dict[str, int]:
        """width and height for an image task whose pipeline would otherwise make its native size
        rather than the input's (SDXL's inpaint pipeline, SD3's image-to-image and inpaint), in a
        family that says so; empty otherwise (SD2's calls stay as they were)."""
        takes_size = "width" in inspect.signature(self.pipe.__call__).parameters
        if not (self.family.input_size_keywords and takes_size):
            return {}
        width, height = self.input_size(params)
        return {"width": width, "height": height}

    def scheduler_name(self, params: GenerationParams) -> str:
        return params.scheduler or self.default_scheduler

    def scheduler_mu(self, params: GenerationParams) -> float | None:
        """The `mu` the family's pipeline computes for this sample's call from its image token
        count (FLUX.1: width/16 x height/16) and the scheduler's config, where that scheduler
        shifts by it (use_dynamic_shifting); None otherwise."""
        config = self._scheduler(self.scheduler_name(params)).config
        if not (self.family.dynamic_shift and config.get("use_dynamic_shifting")):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        has_input = self.task.image and params.image is not None
        width, height = self.input_size(params) if has_input else (params.width, params.height)
        if width is None or height is None:  # a failed image-task row: no input was read
            return None
        patch = self.pipe.vae_scale_factor * 2  # the VAE's factor, then 2x2 packing
        return calculate_shift(
            (height // patch) * (width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )


@dataclass(frozen=True)
class PromptTokens:
    """One prompt's tokens per text encoder of the family (None: its tokenizer did not count),
    and what each encoder reads before it truncates."""

    counts: tuple[int | None, ...]
    limits: tuple[int, ...]
    # The encoder whose limit is the call's max_sequence_length (T5); None: none.
    sequence: int | None = None

    def truncated(self, encoder: int) -> bool | None:
        n = self.counts[encoder]
        return None if n is None else n > self.limits[encoder]

    def at_length(self, length: int | None) -> PromptTokens:
        """The same counts against a sample's own T5 length (a swept max_sequence_length)."""
        if self.sequence is None or length is None:
            return self
        limits = list(self.limits)
        limits[self.sequence] = length
        return dataclasses.replace(self, limits=tuple(limits))


class TokenCounter:
    """Tokens per prompt as the text encoder sees them (with start and end tokens), untruncated.

    Prompts longer than `max_tokens` are generated truncated, as diffusers does; the rows record it.
    Pipelines without a single CLIP tokenizer report nothing.
    """

    def __init__(
        self,
        tokenizer,
        family_max_tokens: int = DEFAULT_FAMILY.max_tokens,
        limit: int | None = None,
    ):
        """family_max_tokens: what the family's text encoder reads, for a tokenizer that does not
        say. limit: what the call lets it read (T5: max_sequence_length), where that decides."""
        self.tokenizer = tokenizer
        self.family_max_tokens = family_max_tokens
        self.limit = limit
        self._counting = None

    @property
    def max_tokens(self) -> int:
        if self.limit is not None:
            return self.limit
        return getattr(self.tokenizer, "model_max_length", self.family_max_tokens)

    def count(self, prompts: Sequence[str]) -> dict[str, int]:
        if self.tokenizer is None or not prompts:
            return {}
        if self._counting is None:
            # A copy: the next shard counts tokens while the pipeline encodes prompts for the
            # current one, and a fast tokenizer called from two threads with different settings
            # fails.
            self._counting = copy.deepcopy(self.tokenizer)
        ids = self._counting(
            list(prompts), truncation=False, padding=False, verbose=False
        ).input_ids
        return {p: len(i) for p, i in zip(prompts, ids)}


def scheduler_of(name: str, config, overrides: dict):
    """The diffusers scheduler class `name`, built from a checkpoint's scheduler config with the
    spec's overrides (model.scheduler_config)."""
    import diffusers  # loaded with the pipeline already; kept off this module's import

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelLoadError(unknown_scheduler(name))
    return cls.from_config(config, **overrides)
