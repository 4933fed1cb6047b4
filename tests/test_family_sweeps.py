"""The T5 families' own keys as sweep axes (sweep.axes.max_sequence_length, sweep.axes.true_cfg_scale):
pre-flight checks every swept value as it checks the generation key, each sweep point's samples
carry their own values (batched apart, in their ids and rows), and `plan` costs each point at its
own T5 length and true-CFG passes."""

from __future__ import annotations

import pytest
import yaml

from helpers import job_dict, run_cli, write_prompts


def _plan(tmp_path, source, **sections):
    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = job_dict(source, tmp_path / "in", tmp_path / "out", **sections)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return run_cli("plan", str(tmp_path / "job.yaml"))


def _checked(tmp_path, source, **sections):
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.spec import load_spec

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = job_dict(source, tmp_path / "in", tmp_path / "out", **sections)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return Preflight(load_spec(tmp_path / "job.yaml")).check()


def _axes(**axes):
    return {"sweep": {"axes": axes}}


REFUSED = [
    (
        "schnell",
        _axes(max_sequence_length=[77, 300]),
        "sweep.axes.max_sequence_length=300: a flux (FLUX.1-schnell) checkpoint's T5 encoder "
        "reads at most 256 tokens; use 256 or less",
    ),
    (
        "dev",
        _axes(max_sequence_length=[512, 513]),
        "sweep.axes.max_sequence_length=513: a flux (FLUX.1-dev) checkpoint's T5 encoder reads "
        "at most 512 tokens",
    ),
    (
        "sd3",
        _axes(max_sequence_length=[256, 600]),
        "sweep.axes.max_sequence_length=600: an sd3",
    ),
    (
        "sd2",
        _axes(max_sequence_length=[77, 256]),
        "sweep.axes.max_sequence_length=[77, 256]: an sd2 checkpoint has no T5 encoder to read "
        "it; remove sweep.axes.max_sequence_length",
    ),
    (
        "sd2",
        _axes(true_cfg_scale=[1.0, 4.0]),
        "sweep.axes.true_cfg_scale=[1.0, 4.0]: an sd2 checkpoint has classifier-free guidance of "
        "its own (generation.guidance_scale); remove sweep.axes.true_cfg_scale",
    ),
    (
        "sd3",
        _axes(true_cfg_scale=[2.0, 4.0]),
        "sweep.axes.true_cfg_scale=[2.0, 4.0]: an sd3",
    ),
    (
        "dev",
        {"generation": {"negative_prompt": "blurry"}, **_axes(true_cfg_scale=[1.0, 4.0])},
        "sweep.axes.true_cfg_scale has 1.0: with generation.negative_prompt='blurry', a flux "
        "(FLUX.1-dev) checkpoint is guidance-distilled and reads a negative prompt only with "
        "true_cfg_scale > 1",
    ),
    (
        "dev",
        {
            "generation": {"true_cfg_scale": 4.0},
            **_axes(negative_prompt=["", "blurry"], true_cfg_scale=[4.0, 1.0]),
        },
        "sweep.axes.true_cfg_scale has 1.0: with sweep.axes.negative_prompt",
    ),
]


@pytest.fixture
def checkpoints(tiny_flux, tiny_sd3, tiny_model):
    return {**tiny_flux, "sd3": tiny_sd3, "sd2": tiny_model}


@pytest.mark.parametrize(("checkpoint", "sections", "message"), REFUSED)
def test_swept_values_are_checked_as_the_generation_key_is(
    tmp_path, checkpoints, checkpoint, sections, message
):
    """One line naming the checkpoint kind and sweep.axes.<key>, exit 1, before any worker."""
    out = _plan(tmp_path, checkpoints[checkpoint], **sections)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


def test_the_axes_are_read_as_the_generation_keys_are():
    from sdfleet.schemas.errors import SpecError
    from sdfleet.schemas.spec import parse_spec

    base = {"input": {"uri": "in"}, "output": {"uri": "out"}}
    for axes, message in (
        ({"max_sequence_length": [0, 77]}, "sweep.axes.max_sequence_length has 0"),
        ({"true_cfg_scale": [0.5, 4.0]}, "sweep.axes.true_cfg_scale has 0.5"),
        ({"true_cfg_scale": [4.0, 4]}, "sweep.axes.true_cfg_scale=[4.0, 4] repeats a value"),
    ):
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_spec({**base, "sweep": {"axes": axes}})
    spec = parse_spec({**base, "sweep": {"axes": {"true_cfg_scale": [1, 4]}}})
    assert spec.sweep.axes["true_cfg_scale"] == [1.0, 4.0]
    assert all(isinstance(v, float) for v in spec.sweep.axes["true_cfg_scale"])


def test_each_point_runs_with_its_own_values_batched_and_identified_apart(tmp_path, tiny_flux):
    """A FLUX.1-dev sweep of T5 length x true CFG (a negative prompt, every scale above 1): four
    points per seed, each sample with its point's values, no two in one pipeline call, each with
    its own id; the values the spec leaves out are the checkpoint kind's."""
    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.family_spec import call_inputs, per_sample, record
    from sdfleet.schemas.samples import resolve_params, sample_id, sweep_points

    axes = {"max_sequence_length": [77, 256], "true_cfg_scale": [2.0, 4.0]}
    spec = _checked(
        tmp_path,
        tiny_flux["dev"],
        generation={"negative_prompt": "blurry"},
        sweep={"seeds": 2, "axes": axes},
    ).plan.spec
    points = sweep_points(spec)
    assert [(p["max_sequence_length"], p["true_cfg_scale"]) for p in points[::2]] == [
        (77, 2.0),
        (77, 4.0),
        (256, 2.0),
        (256, 4.0),
    ]
    params = [resolve_params(spec, "a cat", None, "p0", p) for p in points]
    assert [(p.max_sequence_length, p.true_cfg_scale) for p in params[:2]] == [(77, 2.0)] * 2
    # Seeds share a call; axis values never do.
    assert len({p.batch_key() for p in params}) == 4
    assert params[0].batch_key() == params[1].batch_key()
    # What the calls pass and the rows record: the sample's values over the job's.
    job = record(FLUX, call_inputs(FLUX, {"guidance_embeds": True}, spec.generation), False, None)
    assert job == {"max_sequence_length": 512, "true_cfg_scale": 1.0, "scheduler_shift": None}
    rows = [per_sample(job, p) for p in params]
    assert rows[-1] == {"max_sequence_length": 256, "true_cfg_scale": 4.0, "scheduler_shift": None}
    ids = {sample_id("m", None, p, "S", family=row) for p, row in zip(params, rows)}
    assert len(ids) == len(params) == 8


def test_without_the_axes_a_sample_keeps_its_id(tmp_path, tiny_flux):
    """A FLUX job that sweeps neither key: every sample's per-sample values are the job's, so its
    rows and ids are what the job-wide record made them before the keys were sweepable."""
    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.family_spec import call_inputs, per_sample, record
    from sdfleet.schemas.samples import resolve_params, sample_id, sweep_points

    spec = _checked(tmp_path, tiny_flux["dev"], generation={"true_cfg_scale": 3.0}).plan.spec
    job = record(FLUX, call_inputs(FLUX, {"guidance_embeds": True}, spec.generation), False, None)
    for point in sweep_points(spec):
        params = resolve_params(spec, "a cat", None, "p0", point)
        assert per_sample(job, params) == job
        assert sample_id("m", None, params, "S", family=per_sample(job, params)) == sample_id(
            "m", None, params, "S", family=job
        )


def test_plan_costs_each_point_at_its_t5_length_and_true_cfg_passes(tmp_path, tiny_flux):
    """A true-CFG point runs two transformer passes per step, so it costs more than one without;
    a longer T5 sequence costs more than a shorter one; the job's total is the points' sum."""
    from sdfleet.jobs.plan import estimate
    from sdfleet.schemas.family_flux import FLUX

    def per_image(folder, **axes):
        checked = _checked(tmp_path / folder, tiny_flux["dev"], **_axes(**axes))
        assert checked.variant.name == "FLUX.1-dev"  # read with the checkpoint, in pre-flight
        figures = estimate(checked.plan, FLUX.costed_as(checked.variant))
        return figures["tflop_per_image_min"], figures["tflop_per_image_max"], figures["tflop"]

    lo, hi, _ = per_image("cfg", true_cfg_scale=[1.0, 4.0])
    assert 1.8 < hi / lo < 2.0  # twice the transformer, once the text encoders and the decode
    short, long, _ = per_image("t5", max_sequence_length=[77, 512])
    assert long > short
    one_lo, one_hi, _ = per_image("both", max_sequence_length=[77, 512], true_cfg_scale=[1.0, 4.0])
    assert (one_lo, one_hi) == (short, hi)


def test_compile_warm_up_runs_each_swept_t5_length():
    """With torch.compile a T5 length is its own denoiser shape (the text tokens it attends to):
    warm-up makes one per length; a family without T5 keeps its three-entry shapes."""
    from types import SimpleNamespace

    from sdfleet.actors.speed_ups import CompiledWarmUp
    from sdfleet.schemas.samples import GenerationParams

    engine = SimpleNamespace(task=SimpleNamespace(image=False), batch_size=2)
    t5 = [
        GenerationParams("p", "", 0, 28, 3.5, 64, 64, None, max_sequence_length=n, true_cfg_scale=c)
        for n in (77, 512)
        for c in (1.0, 4.0)
    ]
    shapes, sizes = CompiledWarmUp(engine).shapes(t5)
    assert sorted(shapes) == [(64, 64, True, 77), (64, 64, True, 512)] and sizes == [2, 1]
    sd2 = GenerationParams("p", "", 0, 28, 7.5, 64, 64, None, true_cfg_scale=1.0)
    assert list(CompiledWarmUp(engine).shapes([sd2])[0]) == [(64, 64, True)]
