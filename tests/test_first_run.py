"""A new user's first hour: a run that never started does not lock its output, failures are fast and
one line, relative paths mean the spec's folder, `plan` refuses what `run` refuses, the output can be
reached through the spec's storage_options, and a default run is quiet."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from helpers import TINY_GENERATION, run_cli, spec_dict, write_prompts, write_spec
from sdfleet.schemas import layout


def write_job(folder, **sections) -> str:
    """A job spec in `folder`, with paths relative to it; `sections` update its sections."""
    spec = spec_dict(
        name="first-run",
        input={"uri": "prompts"},
        output={"uri": "out", "image_format": "png", "samples_per_shard": 2},
        generation=TINY_GENERATION,
        safety={"detector": "none"},
        resources={"batch_size": 2},
    )
    return str(write_spec(folder, spec, "job.yaml", **sections))


@pytest.fixture
def project(tmp_path):
    write_prompts(tmp_path / "prompts" / "p.parquet", ["a red kite", "a blue boat", "a green door"])
    return tmp_path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdfleet: error:")]


@pytest.mark.slow
def test_a_model_that_does_not_load_fails_once_fast_and_leaves_the_output_to_a_fixed_spec(
    project, tiny_model
):
    broken = project / "models" / "broken"
    shutil.copytree(tiny_model, broken)
    # A config only the workers read (the driver reads the UNet's, VAE's and scheduler's itself).
    (broken / "text_encoder" / "config.json").write_text("{ this is not json")
    spec = write_job(project, model={"source": "models/broken"})  # relative to the spec's folder
    t0 = time.monotonic()
    done = run_cli("run", spec, "--no-progress", env={"RAY_ADDRESS": ""})
    seconds = time.monotonic() - t0
    assert done.returncode == 1, done.stderr[-3000:]
    [line] = error_lines(done.stderr)
    assert (
        f"cannot load model.source {broken}" in line
        and "is not a valid JSON file" in line
        and "on node" in line
    )
    assert done.stderr.count("failed to start") <= 1 and "Traceback" not in done.stderr
    assert "SIGABRT" not in done.stderr and "Rerun the same command" not in done.stderr
    assert seconds < 60, seconds
    old = json.loads((project / "out" / layout.JOB_FILE).read_text())["fingerprint"]

    # The fixed spec takes over the output its broken first run claimed, and says so.
    shutil.copytree(tiny_model, project / "models" / "good")
    fixed = write_job(project, model={"source": "models/good"})
    again = run_cli("run", fixed, "--no-progress", env={"RAY_ADDRESS": ""})
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"held job {old}, which committed no shard" in again.stdout
        and "model.source" in again.stdout
    )
    job = json.loads((project / "out" / layout.JOB_FILE).read_text())
    assert [h["fingerprint"] for h in job["history"]] == [old]
    assert job["spec"]["model"]["source"] == str(project / "models" / "good")  # recorded absolute


def test_relative_paths_are_the_spec_folders_from_any_working_directory(
    project, tiny_model, tmp_path_factory
):
    shutil.copytree(tiny_model, project / "models" / "tiny")
    spec = write_job(project, model={"source": "./models/tiny"})
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sdfleet.jobs.cli", "plan", spec],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run would     start a new job in {project / 'out'}" in done.stdout
    missing = write_job(project, input={"uri": "no-such-folder"})
    refused = subprocess.run(
        [sys.executable, "-m", "sdfleet.jobs.cli", "plan", missing],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        refused.returncode == 1 and str(project / "no-such-folder") in refused.stderr
    )  # shown absolute


def test_command_line_paths_are_the_working_directorys_and_plan_shows_where_all_resolved(
    project, tiny_model, tmp_path_factory
):
    """The one rule: spec-file values against the spec's folder, `--set` values (like every flag)
    against the working directory; `plan` prints each location absolute."""
    import subprocess
    import sys

    elsewhere = tmp_path_factory.mktemp("cwd")
    shutil.copytree(tiny_model, elsewhere / "models" / "tiny")
    spec = write_job(project)  # input.uri: prompts, output.uri: out (the spec's folder's)
    done = subprocess.run(
        [sys.executable, "-m", "sdfleet.jobs.cli", "plan", spec]
        + ["--set", "output.uri=out/x", "--set", "model.source=./models/tiny"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    locations = {
        line.split()[1]: line.split()[2]
        for line in done.stdout.splitlines()
        if line.startswith("location ")
    }
    assert locations == {
        "input.uri": str(project / "prompts"),  # from the spec file: its folder
        "output.uri": str(elsewhere / "out" / "x"),  # from --set: the working directory
        "model.source": str(elsewhere / "models" / "tiny"),
    }
    assert f"run would     start a new job in {elsewhere / 'out' / 'x'}" in done.stdout
    assert not (project / "out").exists()


def test_input_and_output_that_overlap_are_refused(project):
    done = run_cli("plan", write_job(project, output={"uri": "prompts/out"}))
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "overlap" in line and str(project / "prompts" / "out") in line


@pytest.mark.slow
def test_plan_refuses_what_run_refuses_and_says_what_run_would_do(project, tiny_model):
    shutil.copytree(tiny_model, project / "models" / "tiny")
    no_weights = write_job(
        project, model={"source": "models/tiny"}, safety={"detector": "nsfw-detector"}
    )
    [line] = error_lines(run_cli("plan", no_weights).stderr)
    assert "safety.detector='nsfw-detector' needs safety.model" in line
    no_model = write_job(project, model={"source": "./models/none-here"})
    [line] = error_lines(run_cli("plan", no_model).stderr)
    assert f"model.source {project / 'models' / 'none-here'} does not exist" in line

    spec = write_job(project, model={"source": "models/tiny"})
    assert "run would     start a new job" in run_cli("plan", spec).stdout
    assert run_cli("run", spec, "--no-progress", env={"RAY_ADDRESS": ""}).returncode == 0
    assert "run would     resume: 2 of 2 shards committed" in run_cli("plan", spec).stdout
    other = write_job(project, model={"source": "models/tiny"}, generation={"guidance_scale": 3.0})
    for command in ("plan", "run"):
        done = run_cli(command, other, env={"RAY_ADDRESS": ""})
        assert done.returncode == 1, (command, done.stderr[-2000:])
        [line] = error_lines(done.stderr)
        assert "holds a different job with 2 committed shard(s)" in line
        assert "generation.guidance_scale: 7.5 -> 3.0" in line


@pytest.mark.slow
def test_status_preview_and_score_reach_an_output_through_the_specs_storage_options(
    project, tiny_model, s3, s3_endpoint
):
    """Nothing in the environment points at the S3 server or holds a key: only the spec does."""
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    write_prompts(f"{s3.bucket}/prompts/p.parquet", ["a red kite", "a blue boat"], storage=s3)
    shutil.copytree(tiny_model, project / "models" / "tiny")
    spec = write_job(
        project,
        model={"source": "models/tiny"},
        input={"uri": f"s3://{s3.bucket}/prompts/", "storage_options": options},
        output={"uri": f"s3://{s3.bucket}/out", "storage_options": options},
    )
    bare = {
        "AWS_ENDPOINT_URL": None,
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "RAY_ADDRESS": "",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    assert run_cli("run", spec, "--no-progress", env=bare).returncode == 0
    status = run_cli("status", spec, env=bare)
    assert status.returncode == 0 and "complete     yes" in status.stdout
    assert run_cli("preview", spec, env=bare).returncode == 0
    by_uri = run_cli("status", f"s3://{s3.bucket}/out", env=bare)
    assert by_uri.returncode == 1 and len(error_lines(by_uri.stderr)) == 1


@pytest.mark.slow
def test_a_default_run_is_quiet_and_reports_on_stdout(project, tiny_model):
    shutil.copytree(tiny_model, project / "models" / "tiny")
    done = run_cli(
        "run", write_job(project, model={"source": "models/tiny"}), env={"RAY_ADDRESS": ""}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "dataset complete: 3 images" in done.stdout and "3/3" in done.stdout
    )  # summary and progress bar
    noise = [
        line
        for line in done.stderr.splitlines()
        if any(
            word in line
            for word in (
                "absl",
                "I0000",
                "E0000",
                "W0000",
                "cuInit",
                "oneDNN",
                "botocore",
                "Found credentials",
                "pkg_resources",
                "Token authentication",
                "Writing model shards",
                "[transformers]",
                "ms/step",
            )
        )
    ]
    assert noise == []


@pytest.mark.slow
def test_the_smaller_surprises(project, tiny_model):
    done = run_cli("plan", write_job(project, output={"image_format": "jpg"}))
    assert done.returncode == 1 and "did you mean 'jpeg'" in done.stderr
    assert (
        run_cli("status", str(project / "missing")).stderr.strip()
        == f"sdfleet: error: {project / 'missing'} does not exist"
    )
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("sdfleet ")
    assert "exit codes:" in run_cli("--help").stdout and "130" in run_cli("--help").stdout
    shutil.copytree(tiny_model, project / "models" / "tiny")
    spec = write_job(
        project, model={"source": "models/tiny"}, sweep={"axes": {"guidance_scale": [1.0, 7.5]}}
    )
    assert run_cli("run", spec, "--no-progress", env={"RAY_ADDRESS": ""}).returncode == 0
    card = (project / "out" / "README.md").read_text()
    assert "guidance 1.0/7.5" in card
    preview = run_cli("preview", spec, "--prompt-id", "p000")
    assert (
        preview.returncode == 1 and "--prompt-id picks the prompt of an X/Y grid" in preview.stderr
    )


def test_a_hub_model_that_cannot_be_had_is_refused_by_the_driver_in_one_line(project):
    spec = write_job(project, model={"source": "someone/not-in-the-cache"})
    offline = run_cli("plan", spec)  # the tests run with HF_HUB_OFFLINE=1
    [line] = error_lines(offline.stderr)
    assert "HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it" in line
    from helpers import free_port

    t0 = time.monotonic()
    unreachable = run_cli(
        "run",
        spec,
        env={
            "HF_HUB_OFFLINE": None,
            "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "RAY_ADDRESS": "",
        },
    )
    assert unreachable.returncode == 1 and time.monotonic() - t0 < 60
    [line] = error_lines(unreachable.stderr)
    assert "cannot reach the Hugging Face hub for someone/not-in-the-cache" in line
    assert not (project / "out").exists()  # refused before anything was claimed
