import pytest

from helpers import spec_dict
from sdfleet.schemas.fingerprint import diff_fingerprint_fields
from sdfleet.schemas.loading import apply_override
from sdfleet.schemas.spec import JobSpec, SpecError, load_spec, parse_spec

BASE = {"input": {"uri": "s3://b/prompts/"}, "output": {"uri": "s3://b/out/"}}


def spec_with(**sections) -> dict:
    return spec_dict(BASE, **sections)


def error_of(data) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    return str(e.value)


def test_defaults_follow_the_design():
    spec = parse_spec(spec_with())
    assert spec.model.source == "stabilityai/stable-diffusion-2-base"
    assert spec.model.dtype == "float16"
    assert spec.generation.num_inference_steps == 50 and spec.generation.guidance_scale == 7.5
    assert spec.output.samples_per_shard == 1000 and spec.output.image_format == "jpeg"
    assert spec.resources.max_attempts == 3


@pytest.mark.parametrize(
    "data, must_name",
    [
        (spec_with(generation={"guidence_scale": 5}), "generation.guidence_scale"),
        ({**spec_with(), "outptu": {}}, "outptu"),
        (spec_with(model={"dtype": "float8"}), "float8"),
        (spec_with(generation={"width": 4}), "generation.width"),
        (spec_with(generation={"num_inference_steps": 0}), "num_inference_steps=0"),
        (spec_with(sweep={"seeds": 0}), "sweep.seeds=0"),
        (spec_with(sweep={"seeds": [1, 1]}), "repeats a seed"),
        (spec_with(sweep={"axes": {"eta": [1]}}), "sweep.axes.eta cannot be swept"),
        # The image tasks' keys, and what each task needs.
        (
            spec_with(sweep={"axes": {"strength": [0.5]}}),
            "model.task=text-to-image has no strength",
        ),
        (
            spec_with(
                model={"task": "inpaint"}, input={"uri": "s3://b/p/", "image_column": "image"}
            ),
            "model.task=inpaint needs input.mask_column",
        ),
        (
            spec_with(
                model={"task": "upscale"},
                input={"uri": "s3://b/p/", "image_column": "image"},
                generation={"strength": 0.5},
            ),
            "model.task=upscale has no strength",
        ),
        (
            spec_with(
                model={"task": "image-to-image"},
                input={"uri": "s3://b/p/", "image_column": "image"},
                generation={"width": 512},
            ),
            "generation.width: model.task=image-to-image makes each image",
        ),
        (
            spec_with(input={"uri": "s3://b/p/", "image_column": "image"}),
            "input.image_column='image' is for",
        ),
        (spec_with(model={"task": "draw"}), "model.task='draw'"),
        (spec_with(generation={"strength": 1.5}), "generation.strength=1.5"),
        (spec_with(sweep={"axes": {"width": [64, 4]}}), "sweep.axes.width has 4"),
        (spec_with(sweep={"axes": {"guidance_scale": []}}), "non-empty list"),
        (spec_with(output={"samples_per_shard": 20000}), "samples_per_shard=20000"),
        (spec_with(output={"image_format": "gif"}), "'gif'"),
        (spec_with(model={"scheduler": "euler"}), "'euler' is not a diffusers scheduler"),
        (spec_with(resources={"min_workers": 5, "max_workers": 2}), "min_workers=5"),
        ({"output": {"uri": "x"}}, "input: required key is missing"),
    ],
)
def test_bad_values_are_named(data, must_name):
    assert must_name in error_of(data)


def test_overrides_replace_yaml_values_with_parsed_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: in/}\noutput: {uri: out/}\ngeneration: {guidance_scale: 7.5}\n")
    spec = load_spec(
        path,
        [
            "generation.guidance_scale=5",
            "sweep.axes={num_inference_steps: [10, 20]}",
            "model.revision=null",
            "name=my job",
        ],
    )
    assert spec.generation.guidance_scale == 5.0
    assert spec.sweep.axes == {"num_inference_steps": [10, 20]}
    assert spec.model.revision is None
    assert spec.name == "my job"


@pytest.mark.parametrize(
    "override, key, value",
    [
        # A key that takes text keeps what was written where YAML would make something else of it
        ("generation.negative_prompt=yes", "generation.negative_prompt", "yes"),
        ("generation.negative_prompt=no", "generation.negative_prompt", "no"),
        ("generation.negative_prompt=null", "generation.negative_prompt", "null"),
        ("generation.negative_prompt=3.5", "generation.negative_prompt", "3.5"),
        ("engine.compile=off", "engine.compile", "off"),
        ("engine.compile=on", "engine.compile", "on"),
        ("model.revision=1234", "model.revision", "1234"),
        ("name=2024-05-01", "name", "2024-05-01"),
        ("model.refiner.source=123", "model.refiner.source", "123"),
        # ... and takes quotes off as YAML does
        ("generation.negative_prompt='yes'", "generation.negative_prompt", "yes"),
        # ... and what the key takes besides text stays what YAML makes of it
        ("model.revision=null", "model.revision", None),
        ("resources.batch_size=8", "resources.batch_size", 8),
        ("resources.batch_size=auto", "resources.batch_size", "auto"),
        ("engine.channels_last=no", "engine.channels_last", False),
        ("generation.guidance_scale=7", "generation.guidance_scale", 7.0),
    ],
)
def test_set_keeps_a_text_key_text(tmp_path, override, key, value):
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: in/}\noutput: {uri: out/}\n")
    spec = load_spec(path, [override])
    section, *rest = key.split(".")
    got = getattr(spec, section)
    for part in rest:
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


def test_set_leaves_keys_inside_a_free_mapping_as_yaml_makes_them():
    data = spec_with()
    apply_override(data, "input.storage_options.anon=true")
    apply_override(data, "model.scheduler_config.timestep_spacing=trailing")
    assert parse_spec(data).input.storage_options == {"anon": True}


@pytest.mark.parametrize(
    "section, said",
    [
        ({"generation": {"negative_prompt": True}}, "generation.negative_prompt=True"),
        ({"engine": {"compile": False}}, "engine.compile=False"),
        ({"name": 2024}, "name=2024"),
    ],
)
def test_an_unquoted_word_for_a_text_key_in_the_file_says_to_quote_it(section, said):
    line = error_of(spec_with(**section)).splitlines()[1]
    assert line.startswith(f"  {said}: ") and line.endswith(": quote it in the spec file"), line
    assert "YAML read the unquoted value as" in line


def test_a_literal_key_given_a_number_is_not_told_to_quote_it():
    line = error_of(spec_with(output={"image_format": 1})).splitlines()[1]
    assert "quote" not in line


def test_override_errors_name_the_assignment():
    with pytest.raises(SpecError, match="no '='"):
        apply_override({}, "generation.guidance_scale")
    with pytest.raises(SpecError, match="not a section"):
        apply_override({"name": "x"}, "name.sub=1")
    with pytest.raises(SpecError, match=r"generation.guidance_scale='high'"):
        data = spec_with()
        apply_override(data, "generation.guidance_scale=high")
        parse_spec(data)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo pwned']\noutput: {uri: o}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


@pytest.mark.parametrize(
    "override, changes",
    [
        ("generation.guidance_scale=5", True),
        ("generation.num_inference_steps=20", True),
        ("model.source=other/model", True),
        ("model.scheduler=DDIMScheduler", True),
        ("sweep.seeds=3", True),
        ("sweep.base_seed=1", True),
        ("output.image_format=png", True),
        ("output.samples_per_shard=10", True),
        ("input.prompt_column=text", True),
        ("resources.batch_size=2", False),
        ("resources.max_workers=1", False),
        ("output.uri=s3://elsewhere/", False),
        ("name=renamed", False),
        ("input.storage_options={anon: true}", False),
    ],
)
def test_fingerprint_changes_exactly_with_outputs(override, changes):
    base = parse_spec(spec_with())
    data = spec_with()
    apply_override(data, override)
    other = parse_spec(data)
    assert (base.fingerprint() != other.fingerprint()) is changes
    diff = diff_fingerprint_fields(base.fingerprint_fields(), other.fingerprint_fields())
    assert bool(diff) is changes
    if changes:
        assert override.split("=")[0].split(".")[0] in diff[0]


def test_fingerprint_covers_input_files():
    spec = parse_spec(spec_with())
    a = spec.fingerprint([{"uri": "s3://b/p/0.parquet", "size": 10, "rows": 3}])
    b = spec.fingerprint([{"uri": "s3://b/p/0.parquet", "size": 11, "rows": 3}])
    assert a != b


def test_credentials_are_redacted():
    spec = parse_spec(
        spec_with(
            output={
                "storage_options": {
                    "key": "AKIA123",
                    "secret": "s3cr3t",
                    "endpoint_url": "http://minio:9000",
                    "client_kwargs": {"aws_session_token": "T0KV4LUE"},
                }
            }
        )
    )
    red = spec.redacted()
    text = str(red)
    assert "AKIA123" not in text and "s3cr3t" not in text and "T0KV4LUE" not in text
    assert red["output"]["storage_options"]["endpoint_url"] == "http://minio:9000"
    # The model itself still holds them for the workers.
    assert spec.output.storage_options["secret"] == "s3cr3t"


def test_schemas_import_no_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sdfleet.schemas.spec, sdfleet.schemas.samples, sdfleet.schemas.rows, sys; "
        "print(sorted(m for m in ('torch','ray','tensorflow','diffusers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_jobspec_round_trips_through_json():
    spec = parse_spec(spec_with(sweep={"seeds": [3, 1], "axes": {"guidance_scale": [3, 7.5]}}))
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.fingerprint() == spec.fingerprint()


def test_spec_file_paths_are_its_folders_and_set_paths_the_working_directorys(
    tmp_path, monkeypatch
):
    import yaml

    from sdfleet.schemas.loading import resolved_locations

    jobs, cwd = tmp_path / "jobs", tmp_path / "cwd"
    jobs.mkdir()
    cwd.mkdir()
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"source": "./m"}}
    path = jobs / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(cwd)
    spec = load_spec(path, ["output.uri=out/x", "model={source: ./base, vae: ./vae}"])
    assert resolved_locations(spec) == {
        "input.uri": str(jobs / "in"),  # the spec file's
        "output.uri": str(cwd / "out" / "x"),  # --set: the working directory's
        "model.source": str(cwd / "base"),  # a key under a section --set whole counts too
        "model.vae": str(cwd / "vae"),
    }
    assert load_spec(path).model.source == str(jobs / "m")
