"""model.loras (LoRA adapters): the spec's keys and their one-line errors, pre-flight refusing a
missing, pickled or non-LoRA file before any worker starts, the engine's fused LoRA against plain
diffusers' unfused one (SD2 and FLUX.1), the fingerprint unchanged for jobs without LoRAs, and a
Ray job whose rows record the LoRA, regenerate with plain diffusers and refuse a changed file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from helpers import TINY_GENERATION, job_dict, rows_of, run_cli, write_prompts, write_spec
from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.spec import JobSpec, ModelSpec, parse_spec

BASE = {"input": {"uri": "/in"}, "output": {"uri": "/out"}}


@pytest.fixture(scope="module")
def sd2_lora(tiny_model, tmp_path_factory):
    from sdfleet.jobs.tiny_lora import write_tiny_lora

    return write_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora-sd2"))


@pytest.fixture(scope="module")
def flux_lora(tiny_flux, tmp_path_factory):
    from sdfleet.jobs.tiny_lora import write_tiny_lora

    return write_tiny_lora(tiny_flux["dev"], tmp_path_factory.mktemp("lora-flux"))


# ---------------------------------------------------------------- the spec


def _loras(loras) -> JobSpec:
    return parse_spec({**BASE, "model": {"loras": loras}})


def test_names_are_derived_unique_and_scales_kept():
    spec = _loras(
        [
            {"source": "/a/style.safetensors"},
            {"source": "/b/style.safetensors", "scale": 0.5},
            {"source": "/c", "weight_name": "w.safetensors", "name": "mine"},
        ]
    )
    assert [(lo.name, lo.scale) for lo in spec.model.loras] == [
        ("style", 1.0),
        ("style-2", 0.5),
        ("mine", 1.0),
    ]
    assert spec.model.loras[2].location() == "/c/w.safetensors"


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"source": "/a/x.bin"}], "model.loras[0].source='/a/x.bin' is not a .safetensors file"),
        (
            [{"source": "/a", "weight_name": "x.pt"}],
            "model.loras[0].weight_name='x.pt' is not a .safetensors file",
        ),
        ([{"source": "org/repo"}], "give weight_name for a folder or hub id"),
        (
            [{"source": "/a.safetensors", "name": "x"}, {"source": "/b.safetensors", "name": "x"}],
            "model.loras[1].name='x' is used twice",
        ),
        ([{"source": "/a.safetensors", "scale": float("nan")}], "scale=nan is not a finite"),
        ([{"source": "/a.safetensors", "name": "a.b"}], "name='a.b': use 1-64 letters"),
        ([{"source": " "}], "source is empty"),
        ([{"source": "/a.safetensors", "strength": 1}], "model.loras.0.strength: unknown key"),
    ],
)
def test_bad_loras_are_one_line_naming_the_key(loras, message):
    with pytest.raises(SpecError, match="invalid job spec") as e:
        _loras(loras)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("loras", "scales", "message"),
    [
        ([], [0.5, 1.0], "sets the scale of the job's one LoRA, but model.loras has 0"),
        (["/a.safetensors", "/b.safetensors"], [0.5], "but model.loras has 2"),
        (["/a.safetensors"], [0.5, "x"], "sweep.axes.lora_scale value='x' is not a finite"),
        (["/a.safetensors"], [0.5, 0.5], "repeats a value"),
    ],
)
def test_a_lora_scale_sweep_needs_one_lora_and_finite_scales(loras, scales, message):
    data = {
        **BASE,
        "model": {"loras": [{"source": s} for s in loras]},
        "sweep": {"axes": {"lora_scale": scales}},
    }
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert message in str(e.value)
    assert parse_spec(
        {
            **data,
            "model": {"loras": [{"source": "/a.safetensors"}]},
            "sweep": {"axes": {"lora_scale": [0, 1]}},
        }
    ).sweep.axes == {"lora_scale": [0.0, 1.0]}


def test_the_fingerprint_has_loras_only_when_there_are_some():
    plain = parse_spec(BASE)
    assert not any(k.startswith("model.loras") for k in plain.fingerprint_fields())
    # Unchanged against a spec dumped without the key at all: a job made before LoRAs resumes.
    assert plain.fingerprint() == parse_spec({**BASE, "model": {"loras": []}}).fingerprint()
    one = _loras([{"source": "/a/s.safetensors"}])
    half = _loras([{"source": "/a/s.safetensors", "scale": 0.5}])
    assert "model.loras" in one.fingerprint_fields()
    assert len({plain.fingerprint(), one.fingerprint(), half.fingerprint()}) == 3


def test_relative_sources_follow_the_spec_files_folder(tmp_path):
    from sdfleet.schemas.spec import load_spec

    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "s.safetensors").write_bytes(b"")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "input: {uri: ./in}\noutput: {uri: ./out}\n"
        "model: {loras: [{source: ./loras/s.safetensors}, {source: org/repo, "
        "weight_name: w.safetensors}]}\n"
    )
    loaded = load_spec(spec)
    assert loaded.model.loras[0].source == str(tmp_path / "loras" / "s.safetensors")
    assert loaded.model.loras[1].source == "org/repo"  # a hub id stays as written


# ---------------------------------------------------------------- pre-flight (sdfleet plan)


def _plan(tmp_path, model, loras):
    write_prompts(tmp_path / "in" / "p.parquet", ["a red cube"])
    spec = job_dict(
        model, tmp_path / "in", tmp_path / "out", generation=TINY_GENERATION, model={"loras": loras}
    )
    return run_cli("plan", str(write_spec(tmp_path, spec)))


def test_plan_accepts_a_lora_for_the_family(tiny_model, sd2_lora, tmp_path):
    done = _plan(
        tmp_path, tiny_model, [{"source": str(sd2_lora.parent), "weight_name": sd2_lora.name}]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # plan shows where it resolved, as it does every location.
    assert f"{'model.loras[0].source':25}{sd2_lora.parent}\n" in done.stdout


def test_plan_refuses_a_missing_file(tiny_model, tmp_path):
    missing = tmp_path / "nowhere" / "s.safetensors"
    refused = _plan(tmp_path, tiny_model, [{"source": str(missing)}])
    assert refused.returncode == 1
    assert f"model.loras[0].source {missing} does not exist" in refused.stderr


def test_plan_refuses_a_pickle(tiny_model, tmp_path):
    path = tmp_path / "style.bin"
    path.write_bytes(pickle.dumps({"unet.x.lora_A.weight": [0.0]}))
    refused = _plan(tmp_path, tiny_model, [{"source": str(path)}])
    assert refused.returncode == 1
    assert "model.loras[0].source" in refused.stderr and "safetensors only" in refused.stderr
    # ... and a pickle renamed .safetensors: its header says what it is.
    renamed = tmp_path / "style.safetensors"
    renamed.write_bytes(path.read_bytes())
    refused = _plan(tmp_path, tiny_model, [{"source": str(renamed)}])
    assert refused.returncode == 1
    assert f"model.loras[0].source {renamed} is not a readable safetensors file" in refused.stderr


def test_plan_refuses_a_file_that_is_no_lora_for_this_family(tiny_model, flux_lora, tmp_path):
    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    refused = _plan(tmp_path, tiny_model, [{"source": str(weights)}])
    assert refused.returncode == 1
    assert "model.loras[0].source" in refused.stderr and "holds no LoRA weights" in refused.stderr
    refused = _plan(tmp_path, tiny_model, [{"source": str(flux_lora)}])
    assert refused.returncode == 1
    assert "has no LoRA weights for this checkpoint's unet" in refused.stderr


def test_plan_refuses_a_missing_s3_lora_naming_it(tiny_model, s3, tmp_path):
    uri = f"s3://{s3.bucket}/loras/none.safetensors"
    refused = _plan(tmp_path, tiny_model, [{"source": uri}])
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert uri in refused.stderr and "Traceback" not in refused.stderr


# ---------------------------------------------------------------- the engine vs plain diffusers


def _uint8(image) -> np.ndarray:
    return (np.asarray(image) * 255).round().astype(np.uint8).astype(int)


def _engine_image(model: ModelSpec, p: GenerationParams, generation=None) -> np.ndarray:
    from sdfleet.actors.engine import Engine

    engine = Engine(model, device="cpu", batch_size=1, generation=generation)
    [image] = engine.call([p])
    return image.astype(int), engine


def _plain(cls, folder, lora, p: GenerationParams, scale: float, **extra) -> np.ndarray:
    """README's recipe: the pipeline, load_lora_weights, set_adapters at the row's scale; unfused."""
    pipe = cls.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[scale])
    image = pipe(
        p.prompt,
        negative_prompt=p.negative_prompt,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        width=p.width,
        height=p.height,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="np",
        **extra,
    ).images[0]
    return _uint8(image)


def _params(size: int, guidance: float) -> GenerationParams:
    return GenerationParams(
        prompt="a red cube on a table",
        negative_prompt="",
        seed=7,
        num_inference_steps=3,
        guidance_scale=guidance,
        width=size,
        height=size,
        scheduler=None,
    )


def test_sd2_engine_fuses_the_lora_as_plain_diffusers_applies_it(tiny_model, sd2_lora):
    from diffusers import StableDiffusionPipeline

    p = _params(64, 7.5)
    lora = {"source": str(sd2_lora), "scale": 0.7}
    model = ModelSpec(source=str(tiny_model), scheduler=None, loras=[lora])
    ours, engine = _engine_image(model, p)
    assert [lo.record()["scale"] for lo in engine.adapters.loaded] == [0.7]
    assert len(engine.adapters.loaded[0].sha256) == 64
    assert not engine.pipe.get_list_adapters()  # fused and unloaded: a plain UNet
    plain = _plain(StableDiffusionPipeline, tiny_model, sd2_lora, p, 0.7)
    base = _plain(StableDiffusionPipeline, tiny_model, None, p, 0)
    assert np.abs(ours - plain).max() <= 2
    assert np.abs(plain - base).max() > 2  # the LoRA changes the image


def test_flux_engine_fuses_the_lora_as_plain_diffusers_applies_it(tiny_flux, flux_lora):
    from diffusers import FluxPipeline

    from sdfleet.schemas.spec import GenerationSpec

    p = _params(32, 3.5)
    model = ModelSpec(
        source=str(tiny_flux["dev"]), scheduler=None, loras=[{"source": str(flux_lora)}]
    )
    ours, _ = _engine_image(model, p, GenerationSpec(max_sequence_length=16))
    plain = _plain(FluxPipeline, tiny_flux["dev"], flux_lora, p, 1.0, max_sequence_length=16)
    base = _plain(FluxPipeline, tiny_flux["dev"], None, p, 0, max_sequence_length=16)
    assert np.abs(ours - plain).max() <= 2
    assert np.abs(plain - base).max() > 2


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_sd3_and_sdxl_engines_fuse_a_lora_as_plain_diffusers_applies_it(family, request, tmp_path):
    """The other families through the same path: the pipeline class's own LoRA loader."""
    import diffusers

    from sdfleet.jobs.tiny_lora import write_tiny_lora
    from sdfleet.schemas.spec import GenerationSpec

    if family == "sd3":
        folder, cls, size = request.getfixturevalue("tiny_sd3"), "StableDiffusion3Pipeline", 32
        generation, extra = GenerationSpec(max_sequence_length=16), {"max_sequence_length": 16}
    else:
        folder = request.getfixturevalue("tiny_sdxl")["base"]
        cls, size, generation, extra = "StableDiffusionXLPipeline", 64, None, {}
    lora = write_tiny_lora(folder, tmp_path / "lora")
    p = _params(size, 5.0)
    model = ModelSpec(
        source=str(folder), scheduler=None, loras=[{"source": str(lora), "scale": 0.8}]
    )
    ours, _ = _engine_image(model, p, generation)
    plain = _plain(getattr(diffusers, cls), folder, lora, p, 0.8, **extra)
    base = _plain(getattr(diffusers, cls), folder, None, p, 0, **extra)
    assert np.abs(ours - plain).max() <= 2
    assert np.abs(plain - base).max() > 2


def test_a_lora_scale_sweep_keeps_the_lora_live_and_sets_each_batchs_scale(tiny_model, sd2_lora):
    """Batches are grouped by scale and each sets its own; Q, K and V stay unfused (fusing them
    would drop the live LoRA there): every image as plain diffusers makes it at its scale."""
    import dataclasses

    from diffusers import StableDiffusionPipeline

    from sdfleet.actors.engine import Engine

    base = _params(64, 7.5)
    scales = [0.3, 1.0, 0.3, 1.0]
    batch = [dataclasses.replace(base, seed=i, lora_scale=scale) for i, scale in enumerate(scales)]
    model = ModelSpec(source=str(tiny_model), scheduler=None, loras=[{"source": str(sd2_lora)}])
    engine = Engine(model, device="cpu", batch_size=4, warm_up=batch[:2])
    assert engine.adapters.live and "fuse_qkv" not in engine.applied
    made = {}
    for indices, images, _ in engine.generate(batch, 4):
        assert len({scales[i] for i in indices}) == 1  # one scale per pipeline call
        made.update(zip(indices, images))
    for i, p in enumerate(batch):
        plain = _plain(StableDiffusionPipeline, tiny_model, sd2_lora, p, p.lora_scale)
        assert np.abs(made[i].astype(int) - plain).max() <= 2


def test_a_worker_checks_a_remote_lora_before_diffusers_reads_it(tmp_path):
    from sdfleet.actors.lora import check_lora_file
    from sdfleet.schemas.errors import ModelLoadError

    path = tmp_path / "copy.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(
        ModelLoadError, match=r"model.loras\[0\].source .* not a readable safetensors"
    ):
        check_lora_file(path, "unet", "model.loras[0].source")


# ---------------------------------------------------------------- a Ray job, a LoRA on S3


def _images(out) -> dict[str, np.ndarray]:
    import tarfile

    from PIL import Image

    images = {}
    for name in sorted(out.glob("*.tar")):
        with tarfile.open(name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    images[m.name.split(".")[0]] = np.asarray(Image.open(tar.extractfile(m)))
    return images


@pytest.mark.slow
def test_a_job_with_an_s3_lora_records_it_and_refuses_a_changed_file(
    tiny_model, sd2_lora, ray_cluster, s3, tmp_path
):
    """A job whose LoRA is an s3:// file, stopped by its budget after a shard; the LoRA rewritten
    under the same key: the resume is refused naming it. Put back: the job completes, every row
    records the LoRA (the file's sha256, its scale), and plain diffusers regenerates its images."""
    import hashlib

    from diffusers import StableDiffusionPipeline

    from sdfleet.jobs.tiny_lora import write_tiny_lora

    # 1. The LoRA on S3; a job stopped after its first shards.
    key = f"{s3.bucket}/loras/{tmp_path.name}/style.safetensors"
    original = sd2_lora.read_bytes()
    s3.pipe(key, original)
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(4)]
    write_prompts(tmp_path / "in" / "p.parquet", prompts)
    out = tmp_path / "out"
    lora = {"source": f"s3://{key}", "scale": 0.6}
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        out,
        model={"loras": [lora], "scheduler": None},
        generation=TINY_GENERATION,
        output={"samples_per_shard": 1, "image_format": "png"},
        resources={"max_workers": 1, "budget_usd": 0.01, "gpu_hour_usd": 1000.0},
    )
    run = (
        "run",
        str(write_spec(tmp_path, spec)),
        "--address",
        ray_cluster.address,
        "--no-progress",
    )
    first = run_cli(*run)
    assert first.returncode == 2, first.stderr[-3000:]
    done = len(list(out.glob("*_stats.json")))
    assert 1 <= done < len(prompts)

    # 2. Another LoRA under the same key: refused, naming it; nothing more is written.
    other = write_tiny_lora(tiny_model, tmp_path / "other", seed=1)
    s3.pipe(key, other.read_bytes())
    refused = run_cli(*run, "--set", "resources.budget_usd=100")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"model.loras[0].source s3://{key} changed content" in refused.stderr
    assert len(list(out.glob("*_stats.json"))) == done

    # 3. Put back: the job completes; each row records the LoRA as the worker loaded it.
    s3.pipe(key, original)
    resumed = run_cli(*run, "--set", "resources.budget_usd=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = rows_of(str(out))
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    sha = hashlib.sha256(original).hexdigest()
    expected = [
        {"name": "style", "source": f"s3://{key}", "weight_name": None, "sha256": sha, "scale": 0.6}
    ]
    assert all(r["loras"] == expected for r in rows)
    assert "LoRA `style`" in (out / "README.md").read_text()

    # 4. README's recipe: the base pipeline, the LoRA file at the row's scale, unfused.
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(sd2_lora.parent), weight_name=sd2_lora.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[rows[0]["loras"][0]["scale"]])
    images = _images(out)
    for row in rows[:2]:
        image = pipe(
            row["prompt"],
            negative_prompt=row["negative_prompt"],
            num_inference_steps=row["num_inference_steps"],
            guidance_scale=row["guidance_scale"],
            width=row["width"],
            height=row["height"],
            generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
            output_type="np",
        ).images[0]
        assert np.abs(_uint8(image) - images[row["key"]].astype(int)).max() <= 2


@pytest.mark.slow
def test_a_lora_scale_sweep_through_sdfleet_run_records_each_scale(tiny_model, sd2_lora, tmp_path):
    """sdfleet run with sweep.axes.lora_scale: each row's lora_scale and loras[0].scale are the
    scale its image was made at (plain diffusers at that scale regenerates it), and the card says
    the scales."""
    from diffusers import StableDiffusionPipeline

    # 1. run_tiny_job's job (its `model` argument is the source), on an embedded local Ray.
    write_prompts(tmp_path / "in" / "p.parquet", ["a red cube", "a blue sphere"])
    out = tmp_path / "out"
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        out,
        model={"loras": [{"source": str(sd2_lora)}], "scheduler": None},
        generation=TINY_GENERATION,
        sweep={"axes": {"lora_scale": [0.3, 1.0]}},
        output={"image_format": "png"},
        resources={"batch_size": 4, "max_workers": 1},
    )
    done = run_cli("run", str(write_spec(tmp_path, spec)), "--no-progress", env={"RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    # 2. Each row says its scale, and plain diffusers at that scale makes its image.
    rows = rows_of(str(out))
    assert sorted(r["lora_scale"] for r in rows) == [0.3, 0.3, 1.0, 1.0]
    assert all(r["loras"][0]["scale"] == r["lora_scale"] for r in rows)
    assert len({r["sample_id"] for r in rows}) == 4
    assert "scales 0.3/1.0 (swept)" in (out / "README.md").read_text()
    images = _images(out)
    for row in rows:
        p = GenerationParams(
            row["prompt"],
            row["negative_prompt"],
            row["seed"],
            row["num_inference_steps"],
            row["guidance_scale"],
            row["width"],
            row["height"],
            None,
        )
        plain = _plain(StableDiffusionPipeline, tiny_model, sd2_lora, p, row["lora_scale"])
        assert np.abs(images[row["key"]].astype(int) - plain).max() <= 2
