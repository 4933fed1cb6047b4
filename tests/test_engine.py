"""The engine without Ray: tiny real pipeline, loaded through from_pretrained, compared with plain diffusers."""

import shutil

import numpy as np
import pytest
import torch

from sdfleet.actors.components import dtype_keyword
from sdfleet.actors.engine import Engine
from sdfleet.jobs.checkpoint import check_model_source
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.spec import ModelSpec


def params(prompt, seed, guidance=7.5, steps=3, scheduler=None, negative=""):
    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=64,
        height=64,
        scheduler=scheduler,
    )


def plain_diffusers(model_dir, p: GenerationParams, scheduler_cls, **scheduler_config):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        p.prompt,
        negative_prompt=p.negative_prompt,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        width=p.width,
        height=p.height,
        generator=torch.Generator("cpu").manual_seed(p.seed),
    ).images[0]
    return np.asarray(image)


def run(engine, batch, batch_size=2):
    out = {}
    for indices, images, seconds in engine.generate(batch, batch_size):
        assert seconds > 0 and len(indices) <= batch_size
        out.update(zip(indices, images))
    return [out[i] for i in range(len(batch))]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(
        ModelSpec(source=str(tiny_model), dtype="float16", scheduler="EulerDiscreteScheduler"),
        cpu_threads=2,
    )


def test_cpu_falls_back_to_float32(engine):
    assert engine.device == "cpu" and engine.dtype == "float32"
    assert engine.pipe.unet.dtype == torch.float32
    assert type(engine.pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_the_dtype_keyword_is_the_one_the_installed_diffusers_reads():
    # diffusers' from_pretrained reads `dtype` since 0.40; before, it read only `torch_dtype` and
    # would have ignored `dtype`, loading float32.
    assert dtype_keyword("0.40.0") == dtype_keyword("0.42.1") == "dtype"
    assert dtype_keyword("0.39.2") == dtype_keyword("0.32.0") == "torch_dtype"


def test_the_dtype_recorded_is_the_one_the_denoiser_was_loaded_in(tiny_model, monkeypatch, caplog):
    """Were the dtype keyword ignored (an older diffusers), the pipeline would load in torch's
    default dtype: the engine then records that, not the dtype it asked for, and says so."""
    import sdfleet.actors.components as components_module

    monkeypatch.setattr(
        components_module, "dtype_keyword", lambda version: "a_keyword_diffusers_ignores"
    )
    torch.set_default_dtype(torch.float64)
    try:
        engine = Engine(ModelSpec(source=str(tiny_model), dtype="float32"), cpu_threads=1)
    finally:
        torch.set_default_dtype(torch.float32)
    assert engine.pipe.unet.dtype == torch.float64 and engine.dtype == "float64"
    assert "loaded in float64, not the float32 asked for" in caplog.text


def test_batched_engine_matches_plain_diffusers(engine, tiny_model):
    from diffusers import EulerDiscreteScheduler

    batch = [
        params("a red fox in snow", 11),
        params("a lighthouse at dawn", 22),
        params("ramen, 35mm", 33),
    ]
    images = run(engine, batch)
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in images)
    assert not np.array_equal(images[0], images[1])
    for p, img in zip(batch, images):
        ref = plain_diffusers(tiny_model, p, EulerDiscreteScheduler)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


def test_same_seed_same_image_across_calls(engine):
    a = run(engine, [params("a bonsai tree", 5)])[0]
    b = run(engine, [params("something else", 6), params("a bonsai tree", 5)])[1]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_mixed_parameters_are_grouped_not_mixed(engine):
    batch = [
        params("x", 1, guidance=3.0),
        params("x", 1, guidance=7.5),
        params("x", 1, guidance=3.0),
    ]
    calls = [indices for indices, _, _ in engine.generate(batch, batch_size=8)]
    assert sorted(map(sorted, calls)) == [[0, 2], [1]]
    images = run(engine, batch)
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() <= 2
    assert not np.array_equal(images[0], images[1])


def test_scheduler_and_its_config_overrides_match_plain_diffusers(tiny_model, engine):
    from diffusers import DDIMScheduler

    ddim = run(engine, [params("a castle", 9, scheduler="DDIMScheduler")])[0]
    euler = run(engine, [params("a castle", 9)])[0]
    assert not np.array_equal(ddim, euler)
    assert (
        np.abs(
            ddim.astype(int) - plain_diffusers(tiny_model, params("a castle", 9), DDIMScheduler)
        ).max()
        <= 2
    )

    trailing = Engine(
        ModelSpec(
            source=str(tiny_model),
            scheduler="DDIMScheduler",
            scheduler_config={"timestep_spacing": "trailing"},
        ),
        cpu_threads=2,
    )
    assert trailing.pipe.scheduler.config.timestep_spacing == "trailing"
    img = run(trailing, [params("a castle", 9)])[0]
    ref = plain_diffusers(
        tiny_model, params("a castle", 9), DDIMScheduler, timestep_spacing="trailing"
    )
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2
    assert not np.array_equal(img, ddim)


def test_unknown_scheduler_is_refused(engine):
    with pytest.raises(ModelLoadError, match="'NoSuchScheduler' is not a diffusers scheduler"):
        run(engine, [params("x", 1, scheduler="NoSuchScheduler")])


def test_pickle_only_checkpoint_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for f in folder.rglob("*.safetensors"):
        f.with_suffix(".bin").write_bytes(b"pickle would run code here")
        f.unlink()
    with pytest.raises(ModelLoadError, match=r"only pickle weights.*safetensors only"):
        check_model_source(ModelSpec(source=str(folder)))
    with pytest.raises(ModelLoadError, match=r"cannot load model.source"):
        Engine(ModelSpec(source=str(folder)))


def test_missing_local_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_source(ModelSpec(source=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"without model_index.json"):
        check_model_source(ModelSpec(source=str(tmp_path / "empty")))


OFF = dict(channels_last=False, fuse_qkv=False, compile="off", uint8_on_device=False)


@pytest.mark.parametrize(
    "option",
    [
        {"channels_last": True},
        {"fuse_qkv": True},
        {"uint8_on_device": True},
    ],
)
def test_each_speed_up_keeps_outputs_within_tolerance_of_plain_diffusers(option, tiny_model):
    """Every engine option that can run on a CPU, alone, against plain diffusers' pixels."""
    from diffusers import EulerDiscreteScheduler

    from sdfleet.schemas.spec import EngineSpec

    engine = Engine(
        ModelSpec(source=str(tiny_model), scheduler="EulerDiscreteScheduler"),
        cpu_threads=2,
        options=EngineSpec(**{**OFF, **option}),
    )
    assert engine.applied == [k for k, v in option.items() if v]
    batch = [params("a red fox in snow", 11), params("a lighthouse at dawn", 22)]
    for p, img in zip(batch, run(engine, batch)):
        ref = plain_diffusers(tiny_model, p, EulerDiscreteScheduler)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


def test_speed_ups_are_in_the_fingerprint():
    from sdfleet.schemas.spec import parse_spec

    base = {"input": {"uri": "x"}, "output": {"uri": "y"}}
    assert (
        parse_spec(base).fingerprint()
        != parse_spec({**base, "engine": {"channels_last": False}}).fingerprint()
    )


def test_batch_that_fits_is_linear_in_the_measured_peaks():
    from sdfleet.actors.batching import batch_that_fits

    gib = 2**30
    # 3 GiB at batch 1, 4 GiB at batch 2: 1 GiB per image on top of 2 GiB.
    assert batch_that_fits(10 * gib, 3 * gib, 4 * gib, cap=64) == 8
    assert batch_that_fits(1000 * gib, 3 * gib, 4 * gib, cap=64) == 64
    assert batch_that_fits(2.5 * gib, 3 * gib, 4 * gib, cap=64) == 1


def test_out_of_memory_halves_the_batch_and_loses_no_sample(tiny_model, monkeypatch):
    """An injected CUDA out-of-memory error for batches over 2: the engine splits and goes on."""
    engine = Engine(
        ModelSpec(source=str(tiny_model), scheduler="EulerDiscreteScheduler"),
        cpu_threads=2,
        batch_size="auto",
    )
    assert engine.batch_size == 8  # no GPU memory to fill on a CPU
    batch = [params(f"a harbour at night, {i}", 100 + i, steps=2) for i in range(5)]
    expected = run(engine, batch, batch_size=5)

    pipeline_call, sizes = type(engine.pipe).__call__, []

    def limited(pipe, *args, **kwargs):
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return pipeline_call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(engine.pipe), "__call__", limited)
    engine.batch_size = 4
    got = {}
    for indices, images, _ in engine.generate(batch):
        got.update(zip(indices, images))
    assert sizes == [4, 2, 2, 1] and engine.batch_size == 2
    assert sorted(got) == list(range(5))
    for i in range(5):
        assert np.abs(got[i].astype(int) - expected[i].astype(int)).max() <= 2


@pytest.mark.slow
def test_compiled_engine_compiles_each_shape_once_at_start(tiny_model):
    """With torch.compile, the warm-up covers every shape a job's sweep needs: full, partial and
    single-image batches, with and without CFG. Shards after it never compile (a recompile raises)."""
    from diffusers import EulerDiscreteScheduler

    from sdfleet.schemas.spec import EngineSpec

    sweep = [params("", 0, guidance=7.5, steps=3), params("", 0, guidance=1.0, steps=3)]
    engine = Engine(
        ModelSpec(source=str(tiny_model), scheduler="EulerDiscreteScheduler"),
        cpu_threads=2,
        options=EngineSpec(**{**OFF, "compile": "on"}),
        batch_size=4,
        warm_up=sweep,
    )
    assert engine.applied == ["compile"]
    shard = [
        params(f"a tram in fog, {i}", 7 + i, guidance=7.5 if i % 3 else 1.0) for i in range(10)
    ]
    torch._dynamo.config.error_on_recompile = True
    try:
        first = run(engine, shard, batch_size=4)  # CFG on: 4 + 2 + 0; CFG off (i % 3 == 0): 4
        second = run(engine, shard[:8], batch_size=4)  # CFG on: 4 + 1; CFG off: 3
    finally:
        torch._dynamo.config.error_on_recompile = False
    for p, img in zip(shard[:3], first[:3]):
        ref = plain_diffusers(tiny_model, p, EulerDiscreteScheduler)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(first, second))


def test_a_failing_compiler_leaves_compile_auto_eager_and_fails_compile_on(
    tiny_model, monkeypatch, caplog
):
    """The compiler breaks (as without a C compiler in the image): `auto` goes on eager, `on` says so."""
    import torch._inductor.compile_fx as compile_fx
    from diffusers import EulerDiscreteScheduler

    from sdfleet.schemas.spec import EngineSpec

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C compiler found (injected)")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    import sdfleet.actors.engine as engine_module

    monkeypatch.setattr(
        engine_module, "wants_compile", lambda options, device: options.compile != "off"
    )  # as on CUDA
    # Graphs compiled by an earlier test in this process would be reused without calling the compiler.
    torch._dynamo.reset()
    model = ModelSpec(source=str(tiny_model), scheduler="EulerDiscreteScheduler")
    sweep = [params("", 0, steps=2)]
    engine = Engine(
        model,
        cpu_threads=2,
        options=EngineSpec(**{**OFF, "compile": "auto"}),
        batch_size=2,
        warm_up=sweep,
    )
    assert "compile" not in engine.applied and "torch.compile failed" in caplog.text
    p = params("a red fox in snow", 11)
    ref = plain_diffusers(tiny_model, p, EulerDiscreteScheduler)
    assert np.abs(run(engine, [p])[0].astype(int) - ref.astype(int)).max() <= 2
    with pytest.raises(
        ModelLoadError, match=r"engine.compile=on: torch.compile failed: .*no working C compiler"
    ):
        Engine(
            model,
            cpu_threads=2,
            options=EngineSpec(**{**OFF, "compile": "on"}),
            batch_size=2,
            warm_up=sweep,
        )
    torch._dynamo.reset()


def test_vae_tiling_is_opt_in_changes_pixels_and_regenerates_with_plain_tiling(tmp_path):
    """engine.vae_tiling decodes in tiles (the tiny VAE tiles above 64 px): other pixels than a
    whole decode, the same as plain diffusers with vae.enable_tiling()."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdfleet.jobs.tiny import write_tiny_pipeline
    from sdfleet.schemas.spec import EngineSpec

    model = write_tiny_pipeline(tmp_path / "768-v", "768-v")
    p = GenerationParams("a lighthouse", "", 3, 3, 7.5, 96, 96, "EulerDiscreteScheduler")
    spec = ModelSpec(source=str(model), dtype="float32")
    whole = Engine(spec, options=EngineSpec(), batch_size=1)
    tiled = Engine(spec, options=EngineSpec(vae_tiling=True), batch_size=1)
    assert "vae_tiling" in tiled.applied and "vae_tiling" not in whole.applied
    (ours,), (untiled,) = run(tiled, [p], 1), run(whole, [p], 1)
    assert np.abs(ours.astype(int) - untiled.astype(int)).max() > 2

    pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        p.prompt,
        num_inference_steps=3,
        guidance_scale=7.5,
        width=96,
        height=96,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 2


def test_an_input_too_large_for_the_gpu_fails_alone(tiny_model):
    """An injected out-of-memory for one large input image: the batch halves, then that sample alone
    yields SampleFailed with its sizes, and the others are made (a spec-sized text-to-image OOM at
    batch 1 still raises: no row of that shape can be made)."""
    from PIL import Image

    from sdfleet.actors.batching import SampleFailed
    from sdfleet.schemas.samples import InputImage

    class SmallGpu(Engine):
        def call(self, batch):
            if any(p.image is not None and p.image.size[0] > 32 for p in batch):
                raise torch.OutOfMemoryError("injected")
            return super().call(batch)

    engine = SmallGpu(
        ModelSpec(source=str(tiny_model), task="image-to-image", dtype="float32"), batch_size=4
    )
    small, large = (
        InputImage(Image.new("RGB", (side, side), (90, 120, 150)), f"sha-{side}")
        for side in (32, 48)
    )
    batch = [
        GenerationParams("a", "", seed, 2, 7.5, None, None, None, strength=0.8, image=image)
        for seed, image in enumerate([small, small, large, small, large])
    ]
    # One group per input size: the two large ones are tried together, then alone.
    made = {
        i: image
        for indices, images, _ in engine.generate(batch)
        for i, image in zip(indices, images)
    }
    for i in (2, 4):
        assert isinstance(made[i], SampleFailed)
        assert (
            "out of GPU memory for one image-to-image image at 48x48 from its 48x48 input"
            in made[i].reason
        )
    assert all(made[i].shape == (32, 32, 3) for i in (0, 1, 3))
