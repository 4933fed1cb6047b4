"""The engine's lossless speed-ups (`engine.*`): those that need no warm-up, applied once after
loading, and torch.compile with the warm-up that compiles every shape of a job's sweep before the
first shard, loading what an earlier worker compiled from the compile cache
(sdfleet.actors.compile_cache) or saving it there.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sdfleet.actors.compile_cache import OFF, CompileCache, cache_key
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.samples import GenerationParams

if TYPE_CHECKING:
    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.spec import EngineSpec

log = logging.getLogger("sdfleet")

# No CUDA graphs: batch shapes change between sweep points and at a shard's last batch. Those
# partial batches are served by one graph with a dynamic batch dimension, which the warm-up makes
# (torch compiles a dynamic graph at the second batch size it sees).
COMPILE_MODE = "max-autotune-no-cudagraphs"


def qkv_fusable(pipe, fuse_transformer: bool):
    """What fuses Q, K and V into one matmul: SD2's and SDXL's pipeline (its UNet and VAE), or
    the transformer of a family whose row says diffusers' fusion of it is lossless
    (`Family.fuse_transformer_qkv`: FLUX.1's, flux-fast's fused QKV); None: nothing. Not SD3.5's:
    diffusers 0.42's SD3 transformer overrides it with a fused joint processor that skips SD3.5's
    q/k normalization (other pixels) and cannot run Medium's image-only attention."""
    if hasattr(pipe, "fuse_qkv_projections"):
        return pipe
    transformer = getattr(pipe, "transformer", None)
    return (
        transformer if fuse_transformer and hasattr(transformer, "fuse_qkv_projections") else None
    )


def live_adapters(pipe) -> bool:
    """Whether LoRA adapters are loaded and not fused away (model.loras with a lora_scale sweep)."""
    lister = getattr(pipe, "get_list_adapters", None)
    try:
        return bool(lister and any(lister().values()))
    except ValueError:  # diffusers without its peft backend: no adapter can be loaded
        return False


def apply_speed_ups(pipe, options: EngineSpec, fuse_transformer: bool = False) -> list[str]:
    """The speed-ups that need no warm-up (compile comes after the batch size is measured); the
    names of those applied. fuse_transformer: the family's transformer fuses its attention
    losslessly (`Family.fuse_transformer_qkv`). Not with live LoRA adapters (a lora_scale sweep):
    fusing Q, K and V would read their base weights and drop the LoRA there."""
    applied = []
    modules = [
        m for m in (getattr(pipe, "unet", None), getattr(pipe, "vae", None)) if m is not None
    ]
    if options.channels_last:
        for m in modules:
            m.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    fusable = qkv_fusable(pipe, fuse_transformer)
    if options.fuse_qkv and fusable is not None and not live_adapters(pipe):
        fusable.fuse_qkv_projections()
        applied.append("fuse_qkv")
    if options.uint8_on_device:
        applied.append("uint8_on_device")
    if getattr(options, "vae_tiling", False):
        # Decodes in overlapping tiles: a 2048² upscale fits in far less memory, but the
        # blended seams change pixels, so it is opt-in and recorded per row.
        pipe.vae.enable_tiling()
        applied.append("vae_tiling")
    return applied


def denoiser_of(pipe) -> str:
    """The pipeline's denoiser component: its UNet, or a transformer family's transformer."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def wants_compile(options: EngineSpec, device: str) -> bool:
    return options.compile == "on" or (options.compile == "auto" and device.startswith("cuda"))


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """What the compile warm-up took (None: compile failed and `auto` went on eager), and whether
    engine.compile_cache spared it ("hit"), will keep it for later workers ("miss"), or was not
    asked ("off")."""

    seconds: float | None
    cache: str


class CompiledWarmUp:
    """torch.compile on one engine's UNet and VAE decoder, then every shape of the sweep run once,
    so that no shard compiles. Reads the engine's pipeline, device, dtype, options and batch size
    as they are when it runs."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def run(self, params: Sequence[GenerationParams]) -> WarmUp:
        """Compile and warm up every shape, loading what an earlier worker compiled for the same
        graphs from `engine.compile_cache` (then nothing is compiled) or saving it there.

        With compile `auto`, a compiler that fails (no C compiler in the image, a GPU the
        compiler does not support) leaves the engine eager instead of failing every worker."""
        engine = self.engine
        t0 = time.perf_counter()
        # 1. Artifacts an earlier worker saved for these graphs, if the spec keeps any.
        location = getattr(engine.options, "compile_cache", OFF)
        cache, status = None, OFF
        if location != OFF:
            cache = CompileCache(location)
            status = "hit" if cache.load(self.cache_key(params)) else "miss"
        # 2. Compile, then warm up until every shape ran, halving the batch on out-of-memory.
        eager = [
            (pipe, getattr(pipe, denoiser_of(pipe)), pipe.vae.decode) for pipe in self._pipes()
        ]
        self._compile()
        seconds = None
        while True:
            try:
                self.warm_up(params)
                seconds = time.perf_counter() - t0
                log.info(
                    "compile warm-up took %.1fs (engine.compile_cache %s: %s)",
                    seconds,
                    location,
                    status,
                )
                # 3. The key of what was compiled: an OOM above may have halved the batch.
                if cache is not None and status == "miss":
                    cache.save(self.cache_key(params))
                return WarmUp(seconds, status)
            except torch.OutOfMemoryError:
                # Compiled kernels and autotuning take memory that the eager probe did not see.
                if not engine.sizer.halve():
                    raise
                log.warning(
                    "out of GPU memory while compiling; going on with batch %d", engine.batch_size
                )
            # torch raises many kinds here (BackendCompilerFailed, InductorError, ...)
            except Exception as e:  # noqa: BLE001 -- any compile failure falls back to eager
                self._fall_back(e, eager)
                return WarmUp(seconds, status)

    def _pipes(self) -> list:
        """The engine's pipelines: the base, and model.refiner's (which decodes, in its place)."""
        refiner = getattr(self.engine, "refiner", None)
        return [self.engine.pipe] + ([refiner.pipe] if refiner is not None else [])

    def _compile(self) -> None:
        compiled_vaes = set()  # model.vae is one module shared by the base and the refiner
        for pipe in self._pipes():
            name = denoiser_of(pipe)
            setattr(pipe, name, torch.compile(getattr(pipe, name), mode=COMPILE_MODE))
            if id(pipe.vae) not in compiled_vaes:
                compiled_vaes.add(id(pipe.vae))
                pipe.vae.decode = torch.compile(pipe.vae.decode, mode=COMPILE_MODE)
        self.engine.applied.append("compile")

    def _fall_back(self, error: Exception, eager: list[tuple]) -> None:
        """compile `on`: raise the compiler's own error; `auto`: go on with the eager modules."""
        root = error
        for _ in range(8):  # the compiler's own error, under torch's wrappers
            inner = root.__cause__ or getattr(root, "inner_exception", None)
            if inner is None or inner is root:
                break
            root = inner
        reason = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"
        if self.engine.options.compile == "on":
            raise ModelLoadError(
                f"engine.compile=on: torch.compile failed: {reason}. "
                "Set engine.compile: auto (falls back to eager) or off"
            ) from error
        log.warning("torch.compile failed (%s); engine.compile=auto goes on without it", reason)
        for pipe, denoiser, decode in eager:
            setattr(pipe, denoiser_of(pipe), denoiser)
            pipe.vae.decode = decode
        self.engine.applied.remove("compile")

    def shapes(
        self, params: Sequence[GenerationParams]
    ) -> tuple[dict[tuple, GenerationParams], list[int]]:
        """The (width, height, CFG on/off, and a T5 family's text length) shapes of the sweep, and
        the batch sizes each is run at: the full batch, a partial batch and batch 1 (which torch
        always specializes)."""
        # The image tasks' shapes come from their input images, unknown until a shard is read.
        shapes = {} if self.engine.task.image else {_shape(p): p for p in params}
        size = self.engine.batch_size
        return shapes, sorted({size, max(1, size // 2), 1}, reverse=True)

    def warm_up(self, params: Sequence[GenerationParams]) -> None:
        """Run every shape of the sweep at each warm-up batch size, two steps each, so shards
        never compile."""
        shapes, sizes = self.shapes(params)
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
                self.engine.call([probe] * size)
        if shapes:
            log.info(
                "compiled %d shape(s) x batch %s in %.0fs",
                len(shapes),
                sizes,
                time.perf_counter() - t0,
            )

    def cache_key(self, params: Sequence[GenerationParams]) -> str:
        """A key of everything that changes the compiled graphs (see
        sdfleet.actors.compile_cache)."""
        import diffusers  # loaded with the pipeline already; kept off this module's import

        engine = self.engine
        if engine.device.startswith("cuda"):
            device = {
                "name": torch.cuda.get_device_name(engine.device),
                "capability": torch.cuda.get_device_capability(engine.device),
                "cuda": torch.version.cuda,
            }
        else:  # Inductor's CPU code is built for the host's vector instructions
            device = {
                "name": platform.machine(),
                "capability": torch.backends.cpu.get_cpu_capability(),
            }
        shapes, sizes = self.shapes(params)
        return cache_key(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "python": platform.python_version(),
                "device": device,
                "dtype": engine.dtype,
                # "unet" for a UNet family, so that the keys made before others stay.
                denoiser_of(engine.pipe): dict(
                    getattr(engine.pipe, denoiser_of(engine.pipe)).config
                ),
                "vae": dict(engine.pipe.vae.config),
                "options": {
                    "channels_last": engine.options.channels_last,
                    "fuse_qkv": engine.options.fuse_qkv,
                    "mode": COMPILE_MODE,
                },
                "shapes": sorted(shapes),
                "batch_sizes": sizes,
                # model.refiner's graphs too; no key without one, so earlier keys stay.
                **(
                    {"refiner_unet": dict(engine.refiner.pipe.unet.config)}
                    if getattr(engine, "refiner", None) is not None
                    else {}
                ),
            }
        )


def _shape(params: GenerationParams) -> tuple:
    """What a compiled denoiser specializes on for this sample: its size, whether CFG doubles its
    batch, and for a T5 family the text tokens it attends to (a swept max_sequence_length);
    without T5 no fourth entry, so the keys made before the T5 families stay."""
    shape = (params.width, params.height, params.guidance_scale > 1)
    length = params.max_sequence_length
    return shape if length is None else (*shape, length)
