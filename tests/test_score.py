"""`sdfleet score`: CLIP score per image and FID per sweep point, on a dataset made by the real CLI.

The models are tiny and random (jobs.tiny.write_tiny_clip / write_tiny_inception), loaded through
the same loaders as real ones; the figures mean nothing and the outputs must say so. The real FID
InceptionV3 is checked for shape and weight-file compatibility with random weights.
"""

import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import REPO, loaded_by, run_tiny_job, write_prompts

EXAMPLE = REPO / "jobs" / "examples" / "sd2_model_card_eval.yaml"
PROMPTS = [
    "a quiet harbour at dusk",
    "a bowl of cherries",
    "a fox in the snow",
    "two cats on a red sofa",
    "a lighthouse in fog",
]
SCALES = [1.5, 7.5]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from sdfleet.jobs.tiny import write_tiny_clip, write_tiny_inception

    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": str(write_tiny_clip(root / "tiny-clip")),
        "inception": str(write_tiny_inception(root / "tiny-inception.safetensors")),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A few random PNGs of assorted sizes and modes, as a folder of reference photos would have."""
    folder = tmp_path_factory.mktemp("reference")
    sizes = [(80, 60), (64, 64), (50, 90), (120, 100), (64, 48), (72, 72)]
    for i, (w, h) in enumerate(sizes):
        arr = np.random.RandomState(100 + i).randint(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        (im.convert("L") if i == 1 else im).save(folder / f"ref_{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model):
    """A real dataset: 5 prompts x 2 seeds x 2 guidance scales through `sdfleet run` on a local Ray."""
    return run_tiny_job(
        tmp_path_factory.mktemp("score-job"),
        tiny_model,
        PROMPTS,
        sweep={"seeds": 2, "axes": {"guidance_scale": SCALES}},
        output={"image_format": "png", "samples_per_shard": 12},
    )


def read_rows(folder):
    return pa.concat_tables(
        [pq.read_table(p) for p in sorted(folder.glob("[0-9]*.parquet"))]
    ).to_pylist()


@pytest.mark.slow
def test_score_writes_clip_scores_fid_per_guidance_scale_and_a_labelled_plot(
    dataset, scorers, reference
):
    from sdfleet.jobs.score import LOUD_NOTE, run_score

    summary = run_score(
        str(dataset),
        scorers["clip"],
        str(reference),
        batch_size=4,
        device="cpu",
        fid_weights=scorers["inception"],
        fid_size=64,
    )

    ok = [r for r in read_rows(dataset) if r["status"] == "ok"]
    assert len(ok) == len(PROMPTS) * 2 * len(SCALES)
    scores = pq.read_table(dataset / "_scores" / "scores.parquet").to_pylist()
    assert sorted(r["key"] for r in scores) == sorted(r["key"] for r in ok)
    by_key = {r["key"]: r for r in ok}
    for s in scores:
        assert math.isfinite(s["clip_score"]) and 0.0 <= s["clip_score"] <= 100.0
        row = by_key[s["key"]]
        assert (s["sample_id"], s["seed"], s["guidance_scale"], s["prompt_id"]) == (
            row["sample_id"],
            row["seed"],
            row["guidance_scale"],
            row["prompt_id"],
        )
    assert (
        len({round(s["clip_score"], 4) for s in scores}) > 1
    )  # the tiny CLIP does tell images apart

    on_disk = json.loads((dataset / "_scores" / "scores_summary.json").read_text())
    assert on_disk["points"] == summary["points"] and on_disk["group_by"] == ["guidance_scale"]
    assert [p["guidance_scale"] for p in summary["points"]] == SCALES
    for p in summary["points"]:
        assert p["n"] == len(PROMPTS) * 2
        assert math.isfinite(p["fid"]) and p["fid"] >= 0
        mine = [s["clip_score"] for s in scores if s["guidance_scale"] == p["guidance_scale"]]
        assert p["clip_score_mean"] == pytest.approx(np.mean(mine))
    assert summary["images_scored"] == len(ok) and summary["dataset_complete"] is True
    assert summary["fid"]["reference_images"] == 6 and summary["fid"]["arch"] == "tiny-conv"

    # Tiny models: the figures mean nothing, and the summary and the plot say so.
    assert summary["figures_meaningful"] is False
    assert summary["note"].startswith(LOUD_NOTE) and "CLIP model is tiny" in summary["note"]
    assert "not InceptionV3" in summary["note"]
    plot = Image.open(dataset / "_scores" / "scores_fid_vs_clip.png")
    plot.load()
    assert plot.format == "PNG" and plot.size[0] > 400 and plot.size[1] > 300
    assert LOUD_NOTE in plot.info["Description"]


def test_fid_of_the_reference_against_itself_is_zero(scorers, reference):
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from sdfleet.jobs.score.fid import fid_image
    from sdfleet.jobs.score.inception import load_feature_extractor

    extractor = load_feature_extractor(scorers["inception"])
    images = torch.from_numpy(
        np.stack([fid_image(p.read_bytes(), 64) for p in sorted(reference.glob("*.png"))])
    )
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 64, 64)
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-3
    fid.reset()
    fid.update(images, real=True)
    fid.update(images // 3, real=False)  # the same pictures, much darker, are further away
    assert float(fid.compute()) > 0.01


def test_clip_scorer_and_the_plot_work_outside_a_job(scorers):
    """The fast tier's look at score's CLIP scorer and plot (the tests that score a job are slow)."""
    from sdfleet.jobs.score.clip import ClipScorer
    from sdfleet.jobs.score.plot import plot_fid_vs_clip

    scorer = ClipScorer(scorers["clip"], "cpu")
    assert scorer.info["source"] == scorers["clip"] and scorer.info["params"] > 0
    images = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (30, 220)]
    scores = scorer.scores([scorer.pixel_values(im) for im in images], ["a cat", "a dog"])
    assert len(scores) == 2 and all(math.isfinite(s) and 0.0 <= s <= 100.0 for s in scores)
    summary = {
        "job_name": "plot-check",
        "clip_model": {"source": scorers["clip"]},
        "fid": {"reference_images": 6},
        "notes": ["tiny models: the figures mean nothing"],
        "figures_meaningful": False,
    }
    points = [
        {"guidance_scale": g, "clip_score_mean": c, "fid": f}
        for g, c, f in ((1.5, 20.0, 90.0), (7.5, 25.0, 80.0))
    ]
    png = plot_fid_vs_clip(points, ["guidance_scale"], summary)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).info["Description"] == summary["notes"][0]


def test_real_inception_loads_published_parameter_names_and_flags_random_weights(tmp_path):
    """The real network: 2048 features from uint8 images of any size; weights only from safetensors,
    every parameter required; untouched batch-norm statistics are recognised as an untrained net."""
    import torch
    from safetensors.torch import save_file

    from sdfleet.jobs.score.inception import InceptionV3FID, load_feature_extractor
    from sdfleet.jobs.score.sanity import looks_untrained

    torch.manual_seed(0)
    net = InceptionV3FID()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    # A few names from pytorch-fid's pt_inception-2015-12-05 weights, which the file must match.
    for name in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
        "fc.weight",
    ):
        assert name in state
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape[:2] == (192, 2048)
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded = load_feature_extractor(str(tmp_path / "inception.safetensors"))
    assert loaded.arch == "inception-v3-fid" and loaded.num_features == 2048
    with torch.no_grad():
        feats = loaded(torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8))
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    assert looks_untrained(loaded, (torch.nn.BatchNorm2d,))

    # A file for another network (the tiny one, its metadata stripped) is refused, naming what is missing.
    tiny = {"conv1.conv.weight": torch.zeros(8, 3, 3, 3)}
    save_file(tiny, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"does not fit the inception-v3-fid network.*Conv2d_1a_3x3.*conv1.conv.weight",
    ):
        load_feature_extractor(str(tmp_path / "other.safetensors"))
    (tmp_path / "weights.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        load_feature_extractor(str(tmp_path / "weights.pth"))


def test_score_arguments_parse_as_documented():
    import argparse

    from sdfleet.jobs.score import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        [
            "s3://b/out/",
            "--clip-model",
            "m",
            "--reference",
            "s3://b/ref/",
            "--fid-weights",
            "w.safetensors",
            "--out",
            "eval1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
    )
    assert (
        args.output,
        args.clip_model,
        args.reference,
        args.fid_weights,
        args.out,
        args.batch_size,
        args.device,
        args.fid_size,
    ) == ("s3://b/out/", "m", "s3://b/ref/", "w.safetensors", "eval1", 8, "cpu", 299)
    assert p.parse_args(["o", "--clip-model", "m"]).out == "scores"


def test_score_refuses_bad_arguments_before_loading_anything(tmp_path, capsys):
    from sdfleet.jobs.cli import main
    from sdfleet.jobs.score import ScoreError, run_score

    with pytest.raises(ScoreError, match=r"needs both --reference .* and --fid-weights"):
        run_score(str(tmp_path), "no-such-clip", str(tmp_path), device="cpu")
    with pytest.raises(ScoreError, match="--out"):
        run_score(str(tmp_path), "no-such-clip", None, out="../elsewhere", device="cpu")
    (tmp_path / "nothing").mkdir()  # a folder, but no output
    assert main(["score", str(tmp_path / "nothing"), "--clip-model", "no-such-clip"]) == 1
    err = capsys.readouterr().err
    assert "sdfleet: error: " in err and "has no _job.json: it is not an sdfleet output" in err


@pytest.mark.slow
def test_a_second_score_under_the_same_name_is_refused_and_the_first_kept(
    dataset, tmp_path, capsys
):
    """Scores are never replaced: a rerun under a used --out name is refused before any model
    loads (the CLIP model named here does not exist), and the earlier files stay as they were."""
    import shutil

    from sdfleet.jobs.cli import main

    out = tmp_path / "OUTPUT"
    shutil.copytree(dataset, out)
    shutil.rmtree(out / "_scores", ignore_errors=True)  # another test's scores
    earlier = out / "_scores" / "scores_summary.json"
    earlier.parent.mkdir()
    earlier.write_text('{"earlier": true}')
    assert main(["score", str(out), "--clip-model", "no-such-clip"]) == 1
    err = capsys.readouterr().err
    assert f"{earlier} exists: pass --out with another name (e.g. --out scores-2)" in err
    assert earlier.read_text() == '{"earlier": true}'
    assert not (out / "_scores" / "scores.parquet").exists()


def test_importing_score_loads_no_heavy_frameworks():
    """The CLI imports the package to build its parser; the scoring modules load only to score."""
    heavy = ("torch", "ray", "tensorflow", "diffusers", "matplotlib")
    assert loaded_by("sdfleet.jobs.score, sdfleet.jobs.cli", heavy) == []


@pytest.mark.slow
def test_score_reads_and_writes_s3(dataset, scorers, reference, s3, tmp_path, monkeypatch):
    """Dataset, reference images and both models on S3 (moto over HTTP); outputs land in the bucket."""
    from sdfleet.jobs.score import run_score

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    root = f"{s3.bucket}"
    s3.put(str(dataset) + "/", f"{root}/out/", recursive=True)
    if s3.exists(f"{root}/out/_scores"):
        s3.rm(f"{root}/out/_scores", recursive=True)
    s3.put(str(reference) + "/", f"{root}/ref/", recursive=True)
    s3.put(scorers["clip"] + "/", f"{root}/models/clip/", recursive=True)
    s3.put(scorers["inception"], f"{root}/models/inception.safetensors")

    summary = run_score(
        f"s3://{root}/out",
        f"s3://{root}/models/clip",
        f"s3://{root}/ref",
        out="eval",
        batch_size=8,
        device="cpu",
        fid_weights=f"s3://{root}/models/inception.safetensors",
        fid_size=64,
        note="moto run",
    )
    assert summary["fid"]["reference_images"] == 6 and len(summary["points"]) == 2
    assert (
        all(math.isfinite(p["fid"]) for p in summary["points"]) and "moto run" in summary["notes"]
    )
    rows = pq.read_table(io.BytesIO(s3.cat_file(f"{root}/out/_scores/eval.parquet"))).to_pylist()
    assert len(rows) == summary["images_scored"] == len(PROMPTS) * 2 * len(SCALES)
    assert (
        json.loads(s3.cat_file(f"{root}/out/_scores/eval_summary.json"))["points"]
        == summary["points"]
    )
    assert (
        Image.open(io.BytesIO(s3.cat_file(f"{root}/out/_scores/eval_fid_vs_clip.png"))).format
        == "PNG"
    )
    # The same inputs give the same scores wherever they are stored.
    local = (
        pq.read_table(dataset / "_scores" / "scores.parquet").to_pylist()
        if (dataset / "_scores" / "scores.parquet").exists()
        else None
    )
    if local is not None:
        assert sorted((r["key"], round(r["clip_score"], 4)) for r in rows) == sorted(
            (r["key"], round(r["clip_score"], 4)) for r in local
        )


def test_example_spec_plans_the_model_card_protocol(tmp_path, tiny_model):
    """jobs/examples/sd2_model_card_eval.yaml: 10,000 captions x 8 guidance scales = 80,000 samples."""
    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.spec import load_spec

    n = 10_000
    pq.write_table(
        pa.table(
            {
                "prompt": [f"a photo of thing {i}" for i in range(n)],
                "prompt_id": pa.array(range(700_000, 700_000 + n), pa.int64()),
                "image_id": pa.array([i // 2 for i in range(n)], pa.int64()),
            }
        ),
        tmp_path / "coco2017_val_10k.parquet",
    )
    spec = load_spec(
        EXAMPLE,
        [f"input.uri={tmp_path / 'coco2017_val_10k.parquet'}", f"output.uri={tmp_path / 'out'}"],
    )
    assert spec.model.scheduler == "DDIMScheduler" and spec.model.source.startswith("s3://")
    assert spec.generation.num_inference_steps == 50 and (
        spec.generation.width,
        spec.generation.height,
    ) == (512, 512)
    assert spec.sweep.axes == {"guidance_scale": [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}
    assert spec.sweep.num_seeds() == 1
    plan = Planner(spec).plan()
    assert plan.num_samples == 80_000 and plan.num_rows == n and len(plan.points) == 8
    assert load_spec(EXAMPLE).input.uri.startswith("s3://")  # parses as shipped, too
    # And as a user sees it: `sdfleet plan` prints the samples and a cost.
    from helpers import run_cli

    # With the model and detector weights at hand, as plan checks them like run does.
    out = run_cli(
        "plan",
        str(EXAMPLE),
        "--set",
        f"input.uri={tmp_path / 'coco2017_val_10k.parquet'}",
        "--set",
        f"model.source={tiny_model}",
        "--set",
        "safety.detector=none",
        "--set",
        f"output.uri={tmp_path / 'out'}",
    )
    assert out.returncode == 0, out.stderr
    assert "samples       80000" in out.stdout and "cost          $" in out.stdout


# ----------------------------------------------------------- the output's top level (issue 33)


def readme_block(after: str) -> str:
    """The first ```python block after the line `after` in README.md: what a user copies."""
    text = (REPO / "README.md").read_text()
    return text[text.index(after) :].split("```python\n", 1)[1].split("```", 1)[0]


def write_top_level_scores(folder, name: str = "scores") -> None:
    """What `sdfleet score` wrote before it had a folder: NAME.parquet (key, clip_score) and its
    summary beside the shards."""
    pq.write_table(pa.table({"key": ["x"], "clip_score": [20.0]}), folder / f"{name}.parquet")
    (folder / f"{name}_summary.json").write_text("{}")


def test_top_level_scores_are_retired_but_never_a_shard(tmp_path):
    from sdfleet.actors.storage import Storage
    from sdfleet.jobs.score.run import retire_top_level_scores

    write_top_level_scores(tmp_path)
    write_prompts(tmp_path / "00000.parquet", ["a"], status=["ok"], clip_score=[1.0])
    (tmp_path / "00000_summary.json").write_text("{}")
    storage = Storage(str(tmp_path))
    retire_top_level_scores(storage, "scores")
    retire_top_level_scores(storage, "00000")  # `--out 00000`: the shard's name, left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000_summary.json"]


@pytest.mark.slow
def test_score_flags_are_the_working_directorys_and_recorded_absolute(
    dataset, scorers, tmp_path, monkeypatch
):
    """The one path rule (README, Relative paths): a flag's path is the working directory's."""
    import shutil

    from sdfleet.jobs.cli import main

    shutil.copytree(dataset, tmp_path / "OUTPUT")
    shutil.copytree(scorers["clip"], tmp_path / "models" / "clip")
    monkeypatch.chdir(tmp_path)
    argv = ["score", "OUTPUT", "--clip-model", "models/clip", "--device", "cpu", "--out", "cwd"]
    assert main([*argv, "--batch-size", "8"]) == 0
    summary = json.loads((tmp_path / "OUTPUT" / "_scores" / "cwd_summary.json").read_text())
    assert summary["clip_model"]["source"] == str(tmp_path / "models" / "clip")


@pytest.mark.slow
def test_readme_row_reader_reads_exactly_the_rows_of_a_scored_and_previewed_output(
    dataset, scorers, tmp_path
):
    """README's reader snippet, run as a user runs it (cwd holds OUTPUT), on an output scored by
    an earlier sdfleet (scores at the top level), then scored again and previewed."""
    import shutil
    import subprocess
    import sys

    from sdfleet.jobs.preview import run_preview
    from sdfleet.jobs.score import run_score

    out = tmp_path / "OUTPUT"
    shutil.copytree(dataset, out)
    shutil.rmtree(out / "_scores", ignore_errors=True)
    write_top_level_scores(out)
    run_score(str(out), scorers["clip"], None, batch_size=8, device="cpu")
    run_preview(str(out))
    run_preview(str(out), html=True)
    assert (out / "_scores" / "scores.parquet").exists() and (out / "preview").is_dir()
    assert not (out / "scores.parquet").exists() and not (out / "scores_summary.json").exists()

    snippet = readme_block("Read it with any WebDataset reader:")
    assert 'glob.glob("OUTPUT/*.parquet")' in snippet
    report = (
        "\nimport json\n"
        "print(json.dumps({'keys': sorted(rows['key']), 'statuses': sorted(set(rows['status'])),"
        " 'wds': sum(1 for _ in ds), 'hf': len(hf)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet + report],
        cwd=tmp_path,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    shards = read_rows(out)
    assert got["keys"] == sorted(r["key"] for r in shards)
    assert len(got["keys"]) == len(PROMPTS) * 2 * len(SCALES)
    assert got["statuses"] == ["ok"]
    assert got["wds"] == got["hf"] == len(shards)
