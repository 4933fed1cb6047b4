"""The generation engine: one diffusers pipeline (text-to-image, or an image task of the SD2
family: image-to-image, inpaint, depth-to-image, upscale), loaded once, fed in batches.

It has no Ray in it, so a benchmark or a notebook can drive it directly:

    engine = Engine(ModelSpec(source="/models/sd2"), batch_size="auto")
    for indices, images, seconds in engine.generate(params): ...
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdfleet.actors.storage import is_remote, local_copy
from sdfleet.schemas.errors import ModelLoadError, first_line
from sdfleet.schemas.samples import GenerationParams, InputImage
from sdfleet.schemas.tasks import TASKS, TEXT_TO_IMAGE

if TYPE_CHECKING:  # duck-typed at run time, so bench/gpu runs where pydantic is not installed
    from sdfleet.schemas.spec import EngineSpec, ModelSpec

log = logging.getLogger("sdfleet")

# Latents are drawn on the CPU so one sample can be regenerated alone on any device, bit for bit.
GENERATOR_DEVICE = "cpu"

# batch_size "auto" on a GPU: the largest batch whose measured memory fits in this share of the
# memory free after loading; the rest is for allocator fragmentation, cuDNN and compile workspaces.
AUTO_BATCH_MEMORY_SHARE = 0.8
# ...and never more than this: the batch range bench/gpu measures tops out at 32, and a larger
# batch only lengthens the partial last batch of every sweep group in a shard.
AUTO_BATCH_CAP = 64
# batch_size "auto" without a GPU: there is no memory to fill and CPU throughput is flat in batch size.
CPU_AUTO_BATCH = 8
# No CUDA graphs: batch shapes change between sweep points and at a shard's last batch. Those
# partial batches are served by one graph with a dynamic batch dimension, which the warm-up makes
# (torch compiles a dynamic graph at the second batch size it sees).
COMPILE_MODE = "max-autotune-no-cudagraphs"


PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")
# How long the driver waits for the Hugging Face hub before saying it cannot reach it.
HUB_TIMEOUT_S = 10.0


def check_model_source(model: ModelSpec) -> None:
    """What the driver can check of the model before any worker starts: the folder and its weight
    formats (safetensors only, per component), or that a hub id can be had at all."""
    source = model.source
    if is_remote(source):
        from sdfleet.actors.storage import Storage

        if not Storage(source, model.storage_options).exists("model_index.json"):
            raise ModelLoadError(
                f"model.source {source} has no model_index.json; point it at a diffusers folder"
            )
    elif Path(source).expanduser().exists():
        _check_local_pipeline(Path(source).expanduser())
    elif source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.source {source} does not exist")
    else:
        _check_hub_pipeline(source, model.revision)


def _check_local_pipeline(folder: Path) -> None:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.source {folder} is a local path without model_index.json; point it at a "
            "diffusers pipeline folder (save_pretrained output)"
        )
    # Every component with weights must have them as safetensors: one pickle-only component would
    # fail only inside the workers.
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = [p.name for p in component.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(component.rglob("*.safetensors")):
            raise ModelLoadError(
                f"model.source {folder} holds only pickle weights for {component.name} ({pickles[0]}); sdfleet "
                "loads safetensors only. Convert it with `pipe.save_pretrained(dir, safe_serialization=True)` "
                "in a trusted environment"
            )


def _check_hub_pipeline(repo: str, revision: str | None) -> None:
    """A hub id: in the local cache when offline, else on a hub that answers, with safetensors."""
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    advice = "point model.source at a local folder or an s3:// mirror"
    if hub_constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if not isinstance(cached, str):
            raise ModelLoadError(
                f"model.source {repo} is a hub id, HF_HUB_OFFLINE is set and the local Hugging Face "
                f"cache does not hold it: {advice}"
            )
        return
    try:
        info = huggingface_hub.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 -- network, not found, gated: each is said in one line
        kind = type(e).__name__
        if "NotFound" in kind or "Gated" in kind:
            raise ModelLoadError(
                f"model.source {repo}: the hub has no such model you may read ({kind}); {advice}, "
                "or log in with a token that may read it"
            ) from None
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub for {repo} ({kind}: {first_line(e)[:120]}): "
            f"{advice}, or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None
    names = [s.rfilename for s in info.siblings or []]
    if names and not any(n.endswith(".safetensors") for n in names):
        raise ModelLoadError(
            f"model.source {repo} has no safetensors weights on the hub; sdfleet loads "
            f"safetensors only: {advice} holding a converted copy"
        )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's JSON configs say about it: enough to check it fits the task and to know
    its native image size, before any worker (or torch) loads it."""

    source: str
    class_name: str | None  # model_index.json's _class_name
    components: frozenset[str]
    unet_in_channels: int | None  # None: no UNet (a transformer-based family)
    sample_size: int | None  # the UNet's latent size
    vae_scale_factor: int
    prediction_type: str | None

    @property
    def default_size(self) -> int | None:
        """The size it was trained at (512-base: 64 * 8, 768-v: 96 * 8), or None where unknown."""
        return self.sample_size * self.vae_scale_factor if self.sample_size else None

    def describe(self) -> str:
        unet = (
            f" with a {self.unet_in_channels}-channel UNet"
            if self.unet_in_channels is not None
            else ""
        )
        return f"a {self.class_name or 'diffusers pipeline'}{unet}"


def read_checkpoint(model: ModelSpec) -> Checkpoint:
    """Read model_index.json and the UNet's and VAE's configs from a local folder, an s3:// mirror
    or the hub (its cache when offline), without loading a weight."""
    source = model.source

    def config(name: str) -> dict:
        try:
            if is_remote(source):
                from sdfleet.actors.storage import Storage

                storage = Storage(source, model.storage_options)
                return storage.read_json(name) if storage.exists(name) else {}
            local = Path(source).expanduser()
            if local.exists():
                return json.loads((local / name).read_text()) if (local / name).is_file() else {}
            import huggingface_hub

            try:
                return json.loads(
                    Path(
                        huggingface_hub.hf_hub_download(source, name, revision=model.revision)
                    ).read_text()
                )
            except huggingface_hub.errors.EntryNotFoundError:
                return {}
            except Exception as e:  # noqa: BLE001 -- the hub's network errors are not OSErrors
                raise OSError(
                    f"the hub did not give it: {type(e).__name__}: {first_line(e)}"
                ) from e
        except (OSError, ValueError) as e:  # ValueError: not JSON
            raise ModelLoadError(
                f"cannot read {name} of model.source {source}: {type(e).__name__}: {first_line(e)}"
            ) from None

    index = config("model_index.json")
    unet = config("unet/config.json") if "unet" in index else {}
    vae = config("vae/config.json") if "vae" in index else {}
    scheduler = config("scheduler/scheduler_config.json") if "scheduler" in index else {}
    blocks = len(vae.get("block_out_channels", [0, 0, 0, 0]))
    return Checkpoint(
        source=source,
        class_name=index.get("_class_name"),
        components=frozenset(k for k in index if not k.startswith("_")),
        unet_in_channels=unet.get("in_channels"),
        sample_size=unet.get("sample_size"),
        vae_scale_factor=2 ** (blocks - 1),
        prediction_type=scheduler.get("prediction_type"),
    )


def check_task(task_name: str, checkpoint: Checkpoint) -> None:
    """The checkpoint is one the task can run: its UNet takes the task's conditioning channels and
    it has the task's extra component. Else the error names both, before any GPU starts."""
    task = TASKS[task_name]
    fits = (
        checkpoint.unet_in_channels == task.unet_in_channels
        if checkpoint.unet_in_channels is not None
        else task_name == TEXT_TO_IMAGE
    )
    if task.needs_component and task.needs_component not in checkpoint.components:
        fits = False
    if fits:
        return
    made_for = [
        n
        for n, t in TASKS.items()
        if n != "image-to-image"
        and t.unet_in_channels == checkpoint.unet_in_channels
        and (t.needs_component or "") in checkpoint.components | {""}
    ]
    advice = f"; it is made for model.task: {made_for[0]}" if made_for else ""
    needs = f"a {task.unet_in_channels}-channel UNet" + (
        f" and a {task.needs_component}" if task.needs_component else ""
    )
    raise ModelLoadError(
        f"model.task={task_name} loads {task.pipeline}, which needs {needs}; model.source "
        f"{checkpoint.source} is {checkpoint.describe()}{advice}"
    )


def check_scheduler_names(names: Sequence[str]) -> None:
    """Each name is a scheduler class the installed diffusers defines. Read from diffusers' source,
    not by importing it: diffusers loads torch, which `sdfleet plan` must not."""
    import importlib.util

    found = importlib.util.find_spec("diffusers")
    folder = Path(found.origin).parent / "schedulers" if found and found.origin else None
    defined = {
        m.group(1)
        for f in (folder.rglob("scheduling_*.py") if folder else ())
        for m in re.finditer(r"^class (\w+Scheduler\w*)\(", f.read_text(), re.M)
    }
    for name in names:
        if name not in defined:
            raise ModelLoadError(
                f"scheduler {name!r} is not a diffusers scheduler class; e.g. EulerDiscreteScheduler"
            )


@dataclasses.dataclass(frozen=True)
class SampleFailed:
    """In place of an image: why this one sample could not be made (its row records it)."""

    reason: str


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
    ):
        """batch_size: images per pipeline call, or "auto" to fill the GPU's memory.
        warm_up: one GenerationParams per sweep point; with torch.compile on, every shape they
        need is compiled here, once, instead of in the middle of the first shards."""
        import torch

        # 1. Device and dtype. fp16 kernels are slow or missing on CPUs: fall back to float32 there.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = model.dtype
        if self.device == "cpu":
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
            if self.dtype != "float32":
                log.info(
                    "no GPU visible: running %s on the CPU in float32 instead of %s",
                    model.source,
                    self.dtype,
                )
                self.dtype = "float32"
        self.model = model

        # 2. Load with safetensors only: pickle checkpoints can run code on load.
        # transformers warns at import about optional vision backends the pipeline never uses.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import diffusers

        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        path = local_copy(model.source, model.storage_options)
        self.task_name = getattr(model, "task", TEXT_TO_IMAGE)
        self.task = TASKS[self.task_name]
        t0 = time.perf_counter()
        try:
            pipeline_class = getattr(diffusers, self.task.auto_pipeline or self.task.pipeline)
            pipe = pipeline_class.from_pretrained(
                path,
                revision=model.revision,
                use_safetensors=True,
                **{dtype_keyword(diffusers.__version__): getattr(torch, self.dtype)},
            )
        except Exception as e:  # noqa: BLE001 -- a checkpoint that does not load never will on a retry
            raise ModelLoadError(
                f"cannot load model.source {model.source}: {type(e).__name__}: {first_line(e)}"
            ) from e
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
        self.pipe = pipe.to(self.device)
        log.info(
            "loaded %s as %s on %s (%s) in %.1fs",
            model.source,
            type(pipe).__name__,
            self.device,
            self.dtype,
            time.perf_counter() - t0,
        )
        # The size text-to-image makes when the spec gives none: the checkpoint's own.
        sample = getattr(getattr(pipe, "unet", None), "config", {}).get("sample_size")
        scale = getattr(pipe, "vae_scale_factor", 8)
        self.default_size = sample * scale if isinstance(sample, int) else None

        # 3. Schedulers: the checkpoint's own, or the spec's class with its overrides.
        self._base_scheduler_config = self.pipe.scheduler.config
        self.default_scheduler = model.scheduler or type(self.pipe.scheduler).__name__
        self._schedulers = {}
        self.pipe.scheduler = self._scheduler(self.default_scheduler)

        # 4. Lossless speed-ups (engine.*), before the first call so compiled graphs see them.
        if options is None:
            from sdfleet.schemas.spec import EngineSpec

            options = EngineSpec()
        self.options = options
        self.applied = self._speed_up(options)
        # What the compile warm-up took, and whether engine.compile_cache spared it ("hit"),
        # will keep it for later workers ("miss"), or was not asked ("off"); None: no compile.
        self.warm_up_seconds: float | None = None
        self.compile_cache: str | None = None

        # 5. The batch size, measured in eager mode (compiling a probe shape would be wasted).
        self.batch_size = self._fit_batch_size(warm_up) if batch_size == "auto" else int(batch_size)
        # The image tasks' sizes come with their inputs: "auto" measures each new input size on a
        # GPU when it first arrives (a 512² input to the x4 upscaler decodes at 2048², 16x the
        # memory of its native 128² input), and keeps the batch per size.
        self._fit_per_input_size = (
            batch_size == "auto" and self.task.image and self.device.startswith("cuda")
        )
        self._batch_by_input_size: dict[tuple[int, int], int] = {}

        # 6. torch.compile last, then its warm-up: every shape the job's sweep needs, once per actor.
        if self._wants_compile(options):
            self._compile_and_warm_up(warm_up, options)
        log.info(
            "engine speed-ups: %s; batch size %d",
            ", ".join(self.applied) or "none",
            self.batch_size,
        )

    def _wants_compile(self, options) -> bool:
        return options.compile == "on" or (
            options.compile == "auto" and self.device.startswith("cuda")
        )

    def _speed_up(self, options) -> list[str]:
        """The speed-ups that need no warm-up (compile comes after the batch size is measured)."""
        import torch

        pipe, applied = self.pipe, []
        modules = [
            m for m in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)) if m is not None
        ]
        if options.channels_last:
            for m in modules:
                m.to(memory_format=torch.channels_last)
            applied.append("channels_last")
        if options.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
            pipe.fuse_qkv_projections()
            applied.append("fuse_qkv")
        if options.uint8_on_device:
            applied.append("uint8_on_device")
        if getattr(options, "vae_tiling", False):
            # Decodes in overlapping tiles: a 2048² upscale fits in far less memory, but the
            # blended seams change pixels, so it is opt-in and recorded per row.
            pipe.vae.enable_tiling()
            applied.append("vae_tiling")
        return applied

    def _compile(self) -> None:
        import torch

        self.pipe.unet = torch.compile(self.pipe.unet, mode=COMPILE_MODE)
        self.pipe.vae.decode = torch.compile(self.pipe.vae.decode, mode=COMPILE_MODE)
        self.applied.append("compile")

    def _compile_and_warm_up(self, params: Sequence[GenerationParams], options) -> None:
        """Compile and warm up every shape, loading what an earlier worker compiled for the same
        graphs from `engine.compile_cache` (then nothing is compiled) or saving it there.

        With compile `auto`, a compiler that fails (no C compiler in the image, a GPU the
        compiler does not support) leaves the engine eager instead of failing every worker."""
        import torch

        from sdfleet.actors.compile_cache import OFF, CompileCache

        t0 = time.perf_counter()
        location = getattr(options, "compile_cache", OFF)
        cache, self.compile_cache = None, OFF
        if location != OFF:
            cache = CompileCache(location)
            self.compile_cache = "hit" if cache.load(self._compile_cache_key(params)) else "miss"
        eager = self.pipe.unet, self.pipe.vae.decode
        self._compile()
        while True:
            try:
                self._warm_up(params)
                self.warm_up_seconds = time.perf_counter() - t0
                log.info(
                    "compile warm-up took %.1fs (engine.compile_cache %s: %s)",
                    self.warm_up_seconds,
                    location,
                    self.compile_cache,
                )
                if cache is not None and self.compile_cache == "miss":
                    # The key of what was compiled: an OOM above may have halved the batch.
                    cache.save(self._compile_cache_key(params))
                return
            except torch.OutOfMemoryError:
                # Compiled kernels and autotuning take memory that the eager probe did not see.
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                torch.cuda.empty_cache()
                log.warning(
                    "out of GPU memory while compiling; going on with batch %d", self.batch_size
                )
            except (
                Exception
            ) as e:  # torch raises many kinds (BackendCompilerFailed, InductorError, ...)
                root = e
                for _ in range(8):  # the compiler's own error, under torch's wrappers
                    inner = root.__cause__ or getattr(root, "inner_exception", None)
                    if inner is None or inner is root:
                        break
                    root = inner
                reason = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"
                if options.compile == "on":
                    raise ModelLoadError(
                        f"engine.compile=on: torch.compile failed: {reason}. "
                        "Set engine.compile: auto (falls back to eager) or off"
                    ) from e
                log.warning(
                    "torch.compile failed (%s); engine.compile=auto goes on without it", reason
                )
                self.pipe.unet, self.pipe.vae.decode = eager
                self.applied.remove("compile")
                return

    def _warm_up_shapes(
        self, params: Sequence[GenerationParams]
    ) -> tuple[dict[tuple, GenerationParams], list[int]]:
        """The (width, height, CFG on/off) shapes of the sweep, and the batch sizes each is run at:
        the full batch, a partial batch and batch 1 (which torch always specializes)."""
        # The image tasks' shapes come from their input images, unknown until a shard is read.
        shapes = (
            {}
            if self.task.image
            else {(p.width, p.height, p.guidance_scale > 1): p for p in params}
        )
        return shapes, sorted({self.batch_size, max(1, self.batch_size // 2), 1}, reverse=True)

    def _compile_cache_key(self, params: Sequence[GenerationParams]) -> str:
        """A key of everything that changes the compiled graphs (see sdfleet.actors.compile_cache)."""
        import platform

        import diffusers
        import torch

        from sdfleet.actors.compile_cache import cache_key

        if self.device.startswith("cuda"):
            device = {
                "name": torch.cuda.get_device_name(self.device),
                "capability": torch.cuda.get_device_capability(self.device),
                "cuda": torch.version.cuda,
            }
        else:  # Inductor's CPU code is built for the host's vector instructions
            device = {
                "name": platform.machine(),
                "capability": torch.backends.cpu.get_cpu_capability(),
            }
        shapes, sizes = self._warm_up_shapes(params)
        return cache_key(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "python": platform.python_version(),
                "device": device,
                "dtype": self.dtype,
                "unet": dict(self.pipe.unet.config),
                "vae": dict(self.pipe.vae.config),
                "options": {
                    "channels_last": self.options.channels_last,
                    "fuse_qkv": self.options.fuse_qkv,
                    "mode": COMPILE_MODE,
                },
                "shapes": sorted(shapes),
                "batch_sizes": sizes,
            }
        )

    def _warm_up(self, params: Sequence[GenerationParams]) -> None:
        """Run every shape of the sweep at each warm-up batch size, two steps each, so shards never compile."""
        import torch

        shapes, sizes = self._warm_up_shapes(params)
        # Each shape costs up to three graphs per compiled function; torch's default limit is 8.
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, 4 * len(shapes) + 4
        )
        t0 = time.perf_counter()
        for p in shapes.values():
            probe = dataclasses.replace(
                p, prompt="warm-up", negative_prompt="", num_inference_steps=2, seed=0
            )
            for size in sizes:
                self._call([probe] * size)
        if shapes:
            log.info(
                "compiled %d shape(s) x batch %s in %.0fs",
                len(shapes),
                sizes,
                time.perf_counter() - t0,
            )

    def _fit_batch_size(self, params: Sequence[GenerationParams]) -> int:
        """The batch size "auto" starts with: CPU_AUTO_BATCH without a GPU, else what fits at the
        sweep's most demanding shape."""
        if not self.device.startswith("cuda") or not params:
            return CPU_AUTO_BATCH
        return self._fit(self._memory_probe(params))

    def _fit(self, probe: GenerationParams) -> int:
        """The largest batch whose memory, measured at batch 1 and 2 of `probe`, fits in the GPU's free memory."""
        import torch

        peaks = []
        for size in (1, 2):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._call([probe] * size)
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
            *self._output_size(probe),
        )
        return size

    def _memory_probe(self, params: Sequence[GenerationParams]) -> GenerationParams:
        """The sweep point that needs the most memory, one step long. The image tasks' inputs are
        not known yet: they are probed at the checkpoint's native size (the upscaler: its native
        input, 4x larger out), and a larger input that runs out of memory halves the batch then."""
        largest = max(
            params, key=lambda p: ((p.width or 0) * (p.height or 0), p.guidance_scale > 1)
        )
        probe = dataclasses.replace(
            largest, prompt="memory probe", negative_prompt="", num_inference_steps=1, seed=0
        )
        if self.task.image:
            from PIL import Image

            side = (self.default_size or 512) // self.task.scale
            gray = InputImage(Image.new("RGB", (side, side), (128, 128, 128)), sha256="probe")
            white = InputImage(Image.new("L", (side, side), 255), sha256="probe")
            probe = dataclasses.replace(probe, image=gray, mask=white if self.task.mask else None)
        return probe

    def _output_size(self, p: GenerationParams) -> tuple[int, int]:
        if p.image is None:
            return p.width, p.height
        return p.image.size[0] * self.task.scale, p.image.size[1] * self.task.scale

    def _scheduler(self, name: str):
        if name not in self._schedulers:
            import diffusers

            cls = getattr(diffusers, name, None)
            if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
                raise ModelLoadError(
                    f"scheduler {name!r} is not a diffusers scheduler class; "
                    "e.g. EulerDiscreteScheduler"
                )
            self._schedulers[name] = cls.from_config(
                self._base_scheduler_config, **self.model.scheduler_config
            )
        return self._schedulers[name]

    def generate(
        self, params: Sequence[GenerationParams], batch_size: int | None = None
    ) -> Iterator[tuple[list[int], list[np.ndarray], float]]:
        """Yield (indices into params, uint8 HxWx3 images, seconds) batch by batch. An image task's
        sample whose input is too large for the GPU even alone yields a SampleFailed instead.

        Samples are grouped by what must be equal within one pipeline call (steps, guidance,
        size, scheduler), keeping plan order inside each group. A batch that runs out of GPU
        memory is split in half and retried, and the engine keeps the smaller batch size.
        """
        import torch

        fixed = batch_size
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.batch_key(), []).append(i)
        for indices in groups.values():
            size = fixed or self._batch_size_for(params[indices[0]])
            lo = 0
            while lo < len(indices):
                batch = indices[lo : lo + size]
                t0 = time.perf_counter()
                try:
                    images = self._call([params[i] for i in batch])
                except torch.OutOfMemoryError:
                    if len(batch) == 1:
                        sample = params[batch[0]]
                        if sample.image is None:
                            raise  # the spec's own size: no row can be made, so the shard fails
                        # One row's input too large for the GPU: that row fails, the shard goes on.
                        if self.device.startswith("cuda"):
                            torch.cuda.empty_cache()
                        w, h = self._output_size(sample)
                        yield (
                            batch,
                            [
                                SampleFailed(
                                    f"out of GPU memory for one {self.task_name} image at {w}x{h} "
                                    f"from its {sample.image.size[0]}x{sample.image.size[1]} input; "
                                    "resize the input or set engine.vae_tiling: true"
                                )
                            ],
                            time.perf_counter() - t0,
                        )
                        lo += 1
                        continue
                    size = len(batch) // 2
                    log.warning(
                        "out of GPU memory at batch %d; going on with batch %d", len(batch), size
                    )
                    self.batch_size = min(self.batch_size, size)
                    first = params[batch[0]]
                    if first.image is not None and first.image.size in self._batch_by_input_size:
                        self._batch_by_input_size[first.image.size] = size
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    continue
                yield batch, images, time.perf_counter() - t0
                lo += len(batch)

    def _batch_size_for(self, p: GenerationParams) -> int:
        if not self._fit_per_input_size or p.image is None:
            return self.batch_size
        if p.image.size not in self._batch_by_input_size:
            probe = dataclasses.replace(
                p, prompt="memory probe", negative_prompt="", num_inference_steps=1, seed=0
            )
            self._batch_by_input_size[p.image.size] = self._fit(probe)
        return self._batch_by_input_size[p.image.size]

    def _call(self, batch: list[GenerationParams]) -> list[np.ndarray]:
        import torch

        first = batch[0]
        self.pipe.scheduler = self._scheduler(first.scheduler or self.default_scheduler)
        generators = [torch.Generator(GENERATOR_DEVICE).manual_seed(p.seed) for p in batch]
        on_device = self.options.uint8_on_device
        # 1. What every task takes, then the task's own inputs: the size (text-to-image), or the
        #    rows' images and masks, and strength or noise_level.
        task = self.task
        inputs = dict(
            prompt=[p.prompt for p in batch],
            negative_prompt=[p.negative_prompt for p in batch],
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="pt" if on_device else "np",
        )
        if task.image:
            inputs["image"] = [p.image.pixels for p in batch]
        else:
            inputs.update(width=first.width, height=first.height)
        if task.mask:
            inputs["mask_image"] = [p.mask.pixels for p in batch]
        for key in task.parameters:
            inputs[key] = getattr(first, key)
        # 2. The pipeline, then the images as uint8.
        with torch.inference_mode():
            out = self.pipe(**inputs)
            # The same float32 rounding as diffusers' numpy_to_pil, so plain diffusers reproduces
            # every pixel; on the device it moves a quarter of the bytes to the host.
            if on_device:
                images = (out.images.float() * 255).round().clamp(0, 255).to(torch.uint8)
                return list(images.permute(0, 2, 3, 1).cpu().numpy())
        return list((out.images * 255).round().astype(np.uint8))

    @property
    def max_tokens(self) -> int:
        return getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", 77)

    def count_tokens(self, prompts: Sequence[str]) -> dict[str, int]:
        """Tokens per prompt as the text encoder sees them (with start and end tokens), untruncated.

        Prompts longer than `max_tokens` are generated truncated, as diffusers does; the rows record it.
        Pipelines without a single CLIP tokenizer report nothing.
        """
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None or not prompts:
            return {}
        if not hasattr(self, "_counting_tokenizer"):
            # A copy: the next shard counts tokens while the pipeline encodes prompts for the current
            # one, and a fast tokenizer called from two threads with different settings fails.
            self._counting_tokenizer = copy.deepcopy(tokenizer)
        ids = self._counting_tokenizer(
            list(prompts), truncation=False, padding=False, verbose=False
        ).input_ids
        return {p: len(i) for p, i in zip(prompts, ids)}

    def scheduler_name(self, params: GenerationParams) -> str:
        return params.scheduler or self.default_scheduler


def dtype_keyword(diffusers_version: str) -> str:
    """The from_pretrained keyword for the dtype: `dtype` from diffusers 0.40 (the older name then
    warns), `torch_dtype` before (which would ignore `dtype` and load float32)."""
    from packaging.version import Version

    return "dtype" if Version(diffusers_version) >= Version("0.40") else "torch_dtype"


def batch_that_fits(budget: float, peak_1: float, peak_2: float, cap: int) -> int:
    """The batch size whose memory, linear in batch size through the two measured peaks, fits `budget`."""
    per_image = max(peak_2 - peak_1, 1.0)
    fixed = max(peak_1 - per_image, 0.0)
    return int(max(1, min(cap, (budget - fixed) // per_image)))
