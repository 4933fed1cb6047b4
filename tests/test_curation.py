"""Curation scores in the job: one CLIP image embedding per image on the actor's device, read by
clip_score, the aesthetic head and the LAION NSFW head; compared with an independent computation
(transformers' full CLIPModel forward, the heads as numpy from their safetensors tensors)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import rows_of, run_cli, write_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from sdfleet.jobs.tiny import write_tiny_aesthetic_head, write_tiny_clip, write_tiny_nsfw_head

    root = tmp_path_factory.mktemp("curation")
    return {"clip": write_tiny_clip(root / "clip"), "aesthetic": write_tiny_aesthetic_head(root / "a.safetensors"),
            "nsfw": write_tiny_nsfw_head(root / "n.safetensors")}


def numpy_head(path, embeds: np.ndarray) -> np.ndarray:
    """The head's output, computed here from its tensors and metadata, not by sdfleet's Head."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    x = embeds.astype(np.float64)
    if "input_mean" in tensors:
        x = (x - tensors["input_mean"]) / np.sqrt(tensors["input_variance"] + 1e-7)
    n = sum(1 for k in tensors if k.endswith(".weight"))
    for i in range(n):
        x = x @ tensors[f"layers.{i}.weight"].T.astype(np.float64) + tensors[f"layers.{i}.bias"]
        if meta["hidden_activation"] == "relu" and i < n - 1:
            x = np.maximum(x, 0)
    x = x[:, 0]
    return 1 / (1 + np.exp(-x)) if meta["output"] == "sigmoid" else x


def test_job_rows_carry_clip_aesthetic_and_punsafe_scores(tmp_path, tiny_model, scorers, ray_cluster):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    prompts = ["a lighthouse at dusk", "a red fox in the snow", "a bowl of ramen", "a city at night, rain"]
    write_prompts(tmp_path / "in" / "p.parquet", prompts)
    spec = {
        "model": {"source": str(tiny_model)},
        "input": {"uri": str(tmp_path / "in")},
        "generation": {"num_inference_steps": 2, "width": 64, "height": 64},
        "sweep": {"seeds": 2},
        "output": {"uri": str(tmp_path / "out"), "image_format": "png", "samples_per_shard": 4},
        "safety": {"detector": "none"},
        "resources": {"batch_size": 2},
        "curation": {"clip_model": str(scorers["clip"]), "aesthetic_model": str(scorers["aesthetic"]),
                     "nsfw_model": str(scorers["nsfw"])},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = run_cli("run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted(rows_of(str(tmp_path / "out")), key=lambda r: r["key"])
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)

    images = {}
    for tar_path in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            images.update({m.name[:-4]: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                           for m in tar.getmembers() if m.name.endswith(".png")})
    model = CLIPModel.from_pretrained(scorers["clip"], use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(scorers["clip"])
    with torch.no_grad():
        out = model(**processor(text=[r["prompt"] for r in rows], images=[images[r["key"]] for r in rows],
                                return_tensors="pt", padding=True))
    # CLIPModel's forward returns normalized embeddings: CLIPScore is 100 x their dot, clipped at 0.
    expected_clip = (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp(min=0).numpy()
    embeds = out.image_embeds.numpy()
    got = {k: np.array([r[k] for r in rows]) for k in ("clip_score", "aesthetic_score", "punsafe")}
    np.testing.assert_allclose(got["clip_score"], expected_clip, atol=1e-3)
    np.testing.assert_allclose(got["aesthetic_score"], numpy_head(scorers["aesthetic"], embeds), atol=1e-4)
    np.testing.assert_allclose(got["punsafe"], numpy_head(scorers["nsfw"], embeds), atol=1e-4)
    assert len(set(got["clip_score"].round(3))) == 8  # a score per image, not one per shard
    assert 0 <= got["punsafe"].min() and got["punsafe"].max() <= 1

    stats = yaml.safe_load((tmp_path / "out" / "00000_stats.json").read_text())
    assert set(stats["curation_models_sha256"]) == {"clip_model", "aesthetic_model", "nsfw_model"}
    assert stats["stage_seconds"]["curate"] > 0


def test_heads_are_safetensors_of_the_right_kind_and_width(tmp_path, scorers):
    from sdfleet.actors.curation import Curator
    from sdfleet.jobs.tiny import write_tiny_aesthetic_head
    from sdfleet.schemas.errors import ModelLoadError
    from sdfleet.schemas.spec import CurationSpec

    wide = write_tiny_aesthetic_head(tmp_path / "wide.safetensors", embedding_size=768)
    pickle = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    pickle.write_bytes(b"\x80\x04not loaded")
    cases = [
        (CurationSpec(clip_model=str(scorers["clip"]), aesthetic_model=str(wide)),
         "takes 768-wide embeddings, but curation.clip_model's are 16"),
        (CurationSpec(clip_model=str(scorers["clip"]), aesthetic_model=str(scorers["nsfw"])),
         "says it is a 'nsfw' head, not 'aesthetic'"),
        (CurationSpec(clip_model=str(scorers["clip"]), nsfw_model=str(pickle)),
         "is not a .safetensors file; sdfleet loads heads from safetensors only"),
    ]
    for spec, message in cases:
        with pytest.raises(ModelLoadError, match="curation") as e:
            Curator(spec, "cpu")
        assert message in str(e.value)


def test_a_head_without_its_clip_model_is_a_spec_error():
    from sdfleet.schemas.errors import SpecError
    from sdfleet.schemas.spec import parse_spec

    with pytest.raises(SpecError, match="curation.aesthetic_model reads CLIP image embeddings"):
        parse_spec({"input": {"uri": "x"}, "output": {"uri": "y"}, "curation": {"aesthetic_model": "a.safetensors"}})


def test_plan_refuses_a_pickled_head_and_a_missing_clip_model(tmp_path, tiny_model, scorers):
    write_prompts(tmp_path / "in" / "p.parquet", ["a"])
    for curation, message in [
        ({"clip_model": str(scorers["clip"]), "aesthetic_model": str(tmp_path / "ava1-l14-linearMSE.pth")},
         "curation.aesthetic_model=" + str(tmp_path / "ava1-l14-linearMSE.pth") + " is not a .safetensors file"),
        ({"clip_model": str(tmp_path / "no-clip")}, f"curation.clip_model {tmp_path / 'no-clip'} does not exist"),
    ]:
        spec = {"model": {"source": str(tiny_model)}, "input": {"uri": str(tmp_path / "in")},
                "output": {"uri": str(tmp_path / "out")}, "safety": {"detector": "none"}, "curation": curation}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        out = run_cli("plan", str(tmp_path / "job.yaml"))
        assert out.returncode == 1 and message in out.stderr, out.stderr
