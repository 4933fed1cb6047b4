"""`sdfleet plan`'s cost for the transformer families: the variant's FLOPs, picked by the
checkpoint's denoiser config, one transformer pass per step without CFG and two with it.

The SD3.5 and FLUX.1 rows land from other branches; these tests cost families built here from the
SDXL row with the repo's variant counts (schemas/family_flops.py), as those rows state them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import job_dict, run_cli, spec_dict, write_spec
from sdfleet.jobs.image_flops import sequence_inputs
from sdfleet.jobs.plan import Planner, estimate
from sdfleet.schemas import family_flops
from sdfleet.schemas.families import SDXL, Variant
from sdfleet.schemas.spec import parse_spec
from test_plan import make_input

SD3_LIKE = replace(
    SDXL,
    name="sd3",
    denoiser="transformer",
    latent_grid=16,
    size_conditioning=False,
    refiner_pipeline=None,
    refiner_flops=None,
    aesthetic_score=None,
    flops=family_flops.SD35_MEDIUM_FLOPS,
    variants=(
        Variant("sd3.5-medium", {"num_layers": 24}, family_flops.SD35_MEDIUM_FLOPS, 256, 512),
        Variant("sd3.5-large", {"num_layers": 38}, family_flops.SD35_LARGE_FLOPS, 256, 512),
    ),
)
FLUX_LIKE = replace(
    SD3_LIKE,
    name="flux",
    cfg=False,  # guidance-distilled: guidance_scale is an input, not a second pass
    flops=family_flops.FLUX1_DEV_FLOPS,
    variants=(
        Variant("flux1-dev", {"guidance_embeds": True}, family_flops.FLUX1_DEV_FLOPS, 512, 512),
        Variant(
            "flux1-schnell", {"guidance_embeds": False}, family_flops.FLUX1_SCHNELL_FLOPS, 256, 256
        ),
    ),
)


def stated(flops, steps: int, passes: int) -> float:
    """One image at 1024^2 from the stated figures: each pass's transformer forward per step,
    one VAE decode, each pass's prompt through the text encoders."""
    return (
        flops.denoiser_tflop * passes * steps + flops.vae_decode_tflop + flops.text_tflop * passes
    )


def checkpoint(tmp_path, denoiser_config: dict):
    folder = tmp_path / "ckpt"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": []}))
    (folder / "transformer" / "config.json").write_text(json.dumps(denoiser_config))
    return folder


def denoiser_config(source) -> dict:
    return json.loads((source / "transformer" / "config.json").read_text())


def plan_for(tmp_path, source, **generation):
    make_input(tmp_path)
    spec = parse_spec(
        spec_dict(
            model={"source": str(source)},
            input={"uri": str(tmp_path / "in")},
            output={"uri": str(tmp_path / "out")},
            generation={"width": 1024, "height": 1024, **generation},
        )
    )
    return spec, Planner(spec).plan()


@pytest.mark.parametrize(
    "family, config, flops, steps, guidance, passes",
    [
        (SD3_LIKE, {"num_layers": 24}, family_flops.SD35_MEDIUM_FLOPS, 40, 4.5, 2),
        (SD3_LIKE, {"num_layers": 38}, family_flops.SD35_LARGE_FLOPS, 28, 3.5, 2),
        (SD3_LIKE, {"num_layers": 38}, family_flops.SD35_LARGE_FLOPS, 28, 1.0, 1),
        (FLUX_LIKE, {"guidance_embeds": True}, family_flops.FLUX1_DEV_FLOPS, 50, 3.5, 1),
        (FLUX_LIKE, {"guidance_embeds": False}, family_flops.FLUX1_SCHNELL_FLOPS, 4, 0.0, 1),
    ],
)
def test_plans_cost_per_image_is_the_checkpoint_variants_count(
    tmp_path, family, config, flops, steps, guidance, passes
):
    source = checkpoint(tmp_path, {"_class_name": "T", "other": 1, **config})
    _, plan = plan_for(tmp_path, source, num_inference_steps=steps, guidance_scale=guidance)
    costed = family.costed(denoiser_config(source))
    assert costed.flops is flops and costed.name == family.name
    est = estimate(plan, costed)
    assert est["tflop_per_image_max"] == pytest.approx(stated(flops, steps, passes), rel=1e-4)
    assert est["tflop"] == pytest.approx(est["tflop_per_image_max"] * plan.num_samples)


def test_a_checkpoint_of_no_known_variant_is_costed_by_the_familys_own_figures(tmp_path):
    config = denoiser_config(checkpoint(tmp_path, {"num_layers": 12}))
    assert SD3_LIKE.costed(config) is SD3_LIKE
    assert SDXL.costed(config) is SDXL  # no variants


def test_true_cfg_doubles_a_distilled_familys_passes_and_the_t5_length_counts():
    dev = family_flops.FLUX1_DEV_FLOPS
    plain = FLUX_LIKE.tflop_per_image(1024, 1024, 50, 3.5)
    assert plain == pytest.approx(stated(dev, 50, 1), rel=1e-4)
    assert FLUX_LIKE.denoiser_passes(3.5) == 1 and FLUX_LIKE.denoiser_passes(3.5, 4.0) == 2
    # A negative prompt through true_cfg_scale > 1: a second pass per step, and its own prompt.
    doubled = FLUX_LIKE.tflop_per_image(
        1024,
        1024,
        50,
        3.5,
        **sequence_inputs(spec_with(true_cfg_scale=4.0, max_sequence_length=None)),
    )
    assert doubled == pytest.approx(stated(dev, 50, 2), rel=1e-4)
    shorter = FLUX_LIKE.tflop_per_image(
        1024, 1024, 50, 3.5, **sequence_inputs(spec_with(max_sequence_length=256))
    )
    assert shorter == pytest.approx(dev.tflop_per_image(1024, 1024, 50, 1, sequence_length=256))
    assert shorter < plain
    # A spec section without the T5 keys costs at the figures' own length, without true CFG.
    assert sequence_inputs(spec_with()) == {
        "sequence_length": None,
        "true_cfg_scale": 1.0,
        "sequence_encoder": True,
    }


def spec_with(drop_t5: bool = False, **generation):
    """A job spec's model and generation sections with the T5 families' keys given."""
    from sdfleet.schemas.spec import GenerationSpec, ModelSpec

    return SimpleNamespace(
        model=ModelSpec(drop_t5=drop_t5), generation=GenerationSpec(**generation)
    )


def test_dropping_t5_saves_its_encoder_but_not_the_denoisers_text_tokens():
    """SD3.5 without T5 (model.drop_t5) pads zeros for T5's tokens: the transformer's sequence
    is as long, only the encoder's cost goes."""
    medium = family_flops.SD35_MEDIUM_FLOPS
    kept = SD3_LIKE.tflop_per_image(1024, 1024, 40, 4.5, **sequence_inputs(spec_with(False)))
    dropped = SD3_LIKE.tflop_per_image(1024, 1024, 40, 4.5, **sequence_inputs(spec_with(True)))
    t5 = medium.tokens.sequence_encoder.tflop(0, 256)
    assert kept == pytest.approx(stated(medium, 40, 2), rel=1e-4)
    assert kept - dropped == pytest.approx(2 * t5) and t5 > 2


def test_the_throughput_table_says_the_basis_of_every_figure_for_each_dtype():
    import yaml

    from sdfleet.jobs.throughput import THROUGHPUT_TABLE

    table = yaml.safe_load(THROUGHPUT_TABLE.read_text())
    for gpu, row in table.items():
        assert "float16" in row, gpu
        for dtype in ("float16", "bfloat16"):
            figure = row.get(dtype)
            if figure is None:
                continue
            assert figure["basis"] in ("measured", "estimate"), (gpu, dtype)
            assert figure["basis"] == "estimate" or figure.get("run"), (gpu, dtype)
            assert 0 < figure["sustained_tflops"] < row["peak_tflops"], (gpu, dtype)
    assert all("bfloat16" in row for gpu, row in table.items() if gpu != "t4")


def test_plan_picks_the_jobs_dtype_figure_and_says_what_it_is():
    from sdfleet.jobs.throughput import sustained_tflops
    from sdfleet.schemas.errors import SpecError

    bf16, source = sustained_tflops("h100", None, "bfloat16")
    fp16, fp16_source = sustained_tflops("h100", None, "float16")
    assert bf16 != fp16 and source == "gpu_throughput.yaml: h100 bfloat16, estimate"
    assert fp16_source == "gpu_throughput.yaml: h100 float16, estimate"
    assert sustained_tflops("h100", None, "float32") == (
        fp16,
        "gpu_throughput.yaml: h100 float16, estimate, used for float32",
    )
    assert sustained_tflops("t4", 9.0, "bfloat16") == (9.0, "resources.throughput_tflops")
    with pytest.raises(SpecError, match=r"model.dtype=bfloat16: .*gpu_type=t4; pick .*h100"):
        sustained_tflops("t4", None, "bfloat16")


def test_a_bf16_jobs_estimate_uses_the_bf16_figure(tmp_path):
    source = checkpoint(tmp_path, {"guidance_embeds": True})
    spec, plan = plan_for(tmp_path, source, num_inference_steps=28, guidance_scale=3.5)
    plan = replace(
        plan,
        spec=spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": "bfloat16"})}),
    )
    est = estimate(plan, FLUX_LIKE.costed(denoiser_config(source)))
    assert est["throughput_source"] == "gpu_throughput.yaml: h100 bfloat16, estimate"
    assert est["gpu_hours"] == pytest.approx(est["tflop"] / est["sustained_tflops"] / 3600)


def test_an_image_tasks_image_is_costed_at_its_inputs_size_on_a_16px_grid_family():
    """image-to-image on a transformer family: strength x steps transformer steps at the input's
    own size (its latent_grid of 16 is the VAE's 8 times the patch, not a latent scale)."""
    from sdfleet.jobs.image_flops import image_tflop
    from sdfleet.schemas.samples import GenerationParams, InputImage
    from sdfleet.schemas.tasks import TASKS

    large = SD3_LIKE.costed({"num_layers": 38})
    image = InputImage(SimpleNamespace(size=(1024, 768)), "0" * 64)
    params = GenerationParams("p", "", 0, 28, 3.5, None, None, None, strength=0.5, image=image)
    assert image_tflop(large, TASKS["image-to-image"], params, {}) == pytest.approx(
        family_flops.SD35_LARGE_FLOPS.tflop_per_image(1024, 768, 14, 2)
    )


def plan_cli_per_image(tmp_path, tiny: Path, config: dict, **generation) -> str:
    """`sdfleet plan`'s per-image line for a copy of a tiny checkpoint whose transformer config
    says it is a full-size variant (plan reads configs, never weights); its family line names
    the variant."""
    source = tmp_path / "ckpt"
    shutil.copytree(tiny, source)
    path = source / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    make_input(tmp_path)
    spec = job_dict(
        source,
        tmp_path / "in",
        tmp_path / "out",
        model={"dtype": "bfloat16"},
        generation={"width": 1024, "height": 1024, **generation},
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    from sdfleet.schemas.families import family_of

    index = json.loads((source / "model_index.json").read_text())
    variant = family_of(index["_class_name"]).variant(json.loads(path.read_text()))
    family_line = next(line for line in out.stdout.splitlines() if line.startswith("family"))
    assert f", {variant.name} by its transformer config)" in family_line, family_line
    return next(line for line in out.stdout.splitlines() if line.startswith("per image"))


def test_sdfleet_plan_shows_sd35_larges_counted_flops_per_image(tmp_path, request):
    tiny = request.getfixturevalue("tiny_sd3")
    line = plan_cli_per_image(
        tmp_path, tiny, {"num_layers": 38}, num_inference_steps=28, guidance_scale=3.5
    )
    counted = family_flops.SD35_LARGE_FLOPS.tflop_per_image(1024, 1024, 28, 2)
    assert line.split()[2] == f"{counted:.4g}"


@pytest.mark.parametrize(
    "variant, flops, steps",
    [("dev", family_flops.FLUX1_DEV_FLOPS, 28), ("schnell", family_flops.FLUX1_SCHNELL_FLOPS, 4)],
)
def test_sdfleet_plan_shows_flux1s_counted_flops_per_image(
    tmp_path, request, variant, flops, steps
):
    tiny = request.getfixturevalue("tiny_flux")[variant]
    config = {"guidance_embeds": variant == "dev"}
    guidance = 3.5 if variant == "dev" else 0.0
    line = plan_cli_per_image(
        tmp_path, tiny, config, num_inference_steps=steps, guidance_scale=guidance
    )
    assert line.split()[2] == f"{flops.tflop_per_image(1024, 1024, steps, 1):.4g}"
