"""`sdfleet plan` checks every model file the workers will load, from its headers alone, before any
worker starts: a CLIP folder that is not CLIP, heads of the wrong kind or width, detector weights in
the wrong format are each one line naming the key, exit 1; the valid tiny models pass."""

from __future__ import annotations

import pytest

from helpers import job_dict, run_cli, write_prompts, write_spec


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sdfleet.jobs.tiny import (
        write_tiny_aesthetic_head,
        write_tiny_clip,
        write_tiny_clip_checker,
        write_tiny_hf_classifier,
        write_tiny_nsfw_head,
    )

    root = tmp_path_factory.mktemp("plan-models")
    text = root / "notes.h5"
    text.write_text("not a Keras model\n")
    return {
        "clip": write_tiny_clip(root / "clip"),
        "aesthetic": write_tiny_aesthetic_head(root / "a.safetensors"),
        "nsfw": write_tiny_nsfw_head(root / "n.safetensors"),
        "wide nsfw": write_tiny_nsfw_head(root / "wide.safetensors", embedding_size=768),
        "clip-checker": write_tiny_clip_checker(root / "checker"),
        "hf-classifier": write_tiny_hf_classifier(root / "classifier"),
        "text": text,
    }


def plan(tmp_path, tiny_model, **sections):
    write_prompts(tmp_path / "in" / "p.parquet", ["a lighthouse"])
    spec = job_dict(tiny_model, tmp_path / "in", tmp_path / "out", **sections)
    return run_cli("plan", str(write_spec(tmp_path, spec)), env={"HF_HUB_OFFLINE": "1"})


def one_line(done) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def test_plan_refuses_each_model_of_the_wrong_kind_or_format_naming_its_key(
    tmp_path, tiny_model, models
):
    m = {k: str(v) for k, v in models.items()}
    cases = [
        ({"curation": {"clip_model": m["hf-classifier"]}}, "curation.clip_model", "not a CLIP"),
        ({"curation": {"clip_model": str(tiny_model)}}, "curation.clip_model", "no config.json"),
        (
            {"curation": {"clip_model": m["clip"], "aesthetic_model": m["nsfw"]}},
            "curation.aesthetic_model",
            "'nsfw' head, not 'aesthetic'",
        ),
        (
            {"curation": {"clip_model": m["clip"], "nsfw_model": m["wide nsfw"]}},
            "curation.nsfw_model",
            "takes 768-wide embeddings, but curation.clip_model's are 16",
        ),
        (
            {"safety": {"detector": "nsfw-detector", "model": m["text"]}},
            "safety.model",
            "is not an HDF5 file",
        ),
        (
            {"safety": {"detector": "nsfw-detector", "model": m["clip"]}},
            "safety.model",
            "folder without saved_model.pb",
        ),
        (
            {"safety": {"detector": "clip-checker", "model": m["clip"]}},
            "safety.model",
            "is not diffusers' StableDiffusionSafetyChecker",
        ),
        (
            {"safety": {"detector": "hf-classifier", "model": m["clip"]}},
            "safety.model",
            "is not a transformers image classifier",
        ),
        (
            {
                "curation": {"clip_model": m["clip"]},
                "safety": {"detector": "laion-clip-nsfw", "model": m["aesthetic"]},
            },
            "safety.model",
            "'aesthetic' head, not 'nsfw'",
        ),
    ]
    for sections, key, message in cases:
        line = one_line(plan(tmp_path, tiny_model, **sections))
        assert key in line and message in line, (sections, line)


def test_plan_accepts_the_tiny_models_of_each_kind(tmp_path, tiny_model, models):
    m = {k: str(v) for k, v in models.items()}
    curation = {"clip_model": m["clip"], "aesthetic_model": m["aesthetic"], "nsfw_model": m["nsfw"]}
    for sections in [
        {"curation": curation, "safety": {"detector": "laion-clip-nsfw", "model": m["nsfw"]}},
        {"safety": {"detector": "clip-checker", "model": m["clip-checker"]}},
        {"safety": {"detector": "hf-classifier", "model": m["hf-classifier"]}},
    ]:
        done = plan(tmp_path, tiny_model, **sections)
        assert done.returncode == 0, (sections, done.stderr[-3000:])


def test_plan_reads_an_s3_detector_folders_config(tmp_path, tiny_model, models, s3):
    """A detector folder on S3 is checked from its config.json too: a CLIP model uploaded as the
    clip-checker is refused, the real checker passes."""
    for name in ("clip", "clip-checker"):
        s3.put(str(models[name]), f"{s3.bucket}/{name}", recursive=True)
    for folder, code in (("clip", 1), ("clip-checker", 0)):
        uri = f"s3://{s3.bucket}/{folder}"
        done = plan(tmp_path, tiny_model, safety={"detector": "clip-checker", "model": uri})
        assert done.returncode == code, done.stderr[-3000:]
        if code:
            line = one_line(done)
            assert f"safety.model {uri} is not diffusers' StableDiffusionSafetyChecker" in line
