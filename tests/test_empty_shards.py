"""Every reader opens every output: a curated job whose gate rejects all of some shards' images
writes no tar for them (an empty tar breaks Hugging Face datasets' webdataset loader), and the
README's webdataset, datasets and OpenCLIP snippets read what is there. The job writes JPEG, whose
in-job scores are of the image as stored, so `sdfleet score` reproduces them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import TINY_GENERATION, job_dict, rows_of, run_cli, write_prompts, write_spec
from test_score import readme_block

PROMPTS = [
    "a lighthouse at dusk",
    "a red fox in the snow",
    "a bowl of ramen",
    "a city at night, rain",
    "an old map of an island",
    "a cat asleep on a chair",
]


def curated_job(tmp_path, tiny_model, clip, out: str, ray_address: str, **curation):
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / out,
        generation=TINY_GENERATION,
        sweep={"seeds": 2},
        output={"image_format": "jpeg", "samples_per_shard": 2},
        curation={"clip_model": str(clip), **curation},
    )
    write_spec(tmp_path, spec, f"{out}.yaml")
    done = run_cli("run", str(tmp_path / f"{out}.yaml"), "--address", ray_address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / out


def gate_between_shards(rows) -> float:
    """A min_clip_score in the widest gap between the shards' best scores: the shards below it keep
    nothing, the others keep their best image at least."""
    best: dict[str, float] = {}
    for r in rows:
        best[r["shard_id"]] = max(best.get(r["shard_id"], -1e9), r["clip_score"])
    v = sorted(best.values())
    i = max(range(len(v) - 1), key=lambda j: v[j + 1] - v[j])
    assert v[i + 1] - v[i] > 0.05, v  # far from every score, so batching cannot flip one
    return (v[i] + v[i + 1]) / 2


def readers_report(snippet: str) -> str:
    return snippet + (
        "\nimport json\nprint(json.dumps({'wds': sorted(s['__key__'] for s in ds), 'hf': len(hf),"
        " 'rows': len(rows), 'statuses': sorted(set(rows['status']))}))\n"
    )


# What OpenCLIP's webdataset loader does with --train-data (open_clip_train/data.py: expand_urls
# and get_dataset_size), with the webdataset it is built on, for when open_clip is not installed.
OPENCLIP_READ = """
import os, webdataset as wds
shards = wds.shardlists.expand_urls(train_data)
sizes_json = json.load(open(os.path.join(os.path.dirname(shards[0]), "sizes.json")))
counted = sum(int(sizes_json[os.path.basename(s)]) for s in shards)
read = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False).to_tuple("jpg", "txt"))
print(json.dumps({"shards": len(shards), "counted": counted, "read": read,
                  "num_samples": int(train[train.index("--train-num-samples") + 1])}))
"""


def run_snippet(code: str, cwd) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "HF_DATASETS_CACHE": str(cwd / "hf"), "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_gate_that_empties_shards_leaves_no_empty_tar_and_every_reader_opens_the_output(
    tmp_path, tiny_model, ray_cluster
):
    from sdfleet.jobs.tiny import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS, [f"p{i}" for i in range(len(PROMPTS))])
    # 1. The scores without a gate, then a gate that rejects every image of some shards.
    scored = rows_of(str(curated_job(tmp_path, tiny_model, clip, "scored", ray_cluster.address)))
    gate = gate_between_shards(scored)
    out = curated_job(
        tmp_path, tiny_model, clip, "OUTPUT", ray_cluster.address, min_clip_score=gate
    )

    # 2. No tar for a shard that kept nothing, every other tar holds its images; the rows stay.
    rows = rows_of(str(out))
    assert len(rows) == len(scored) == len(PROMPTS) * 2
    kept = {r["shard_id"] for r in rows if r["status"] == "ok"}
    shards = {r["shard_id"] for r in rows}
    assert kept and kept != shards  # some shards keep nothing, some keep images
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == sorted(f"{s:05d}.tar" for s in kept)
    for name in tars:
        with tarfile.open(out / name) as tar:
            assert any(n.endswith(".jpg") for n in tar.getnames()), name
    for r in rows:
        if r["shard_id"] not in kept:
            assert r["status"] == "rejected" and r["rejected_by"] == "min_clip_score", r
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == tars and all(sizes.values())
    assert (out / "_SUCCESS").exists()
    card = (out / "README.md").read_text()
    assert (
        f"{len(shards) - len(kept)} of {len(shards)} shards kept no image and have no tar" in card
    )

    # 3. status --verify, preview and score read it whole.
    for args in (("status", str(out), "--verify"), ("preview", str(out), "--html")):
        done = run_cli(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr[-2000:])
    done = run_cli("score", str(out), "--clip-model", str(clip), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    # The rows' scores (the gate's) are of the image as stored: `sdfleet score` reproduces them.
    scores = pq.read_table(out / "_scores" / "scores.parquet").to_pylist()
    in_job = {r["key"]: r["clip_score"] for r in rows if r["status"] == "ok"}
    assert sorted(s["key"] for s in scores) == sorted(in_job)
    for s in scores:
        assert abs(s["clip_score"] - in_job[s["key"]]) < 1e-4, (s, in_job[s["key"]])

    # 4. The README's readers, as a user runs them (cwd holds OUTPUT).
    ok_keys = sorted(r["key"] for r in rows if r["status"] == "ok")
    got = run_snippet(readers_report(readme_block("Read it with any WebDataset reader:")), tmp_path)
    assert got == {
        "wds": ok_keys,
        "hf": len(ok_keys),
        "rows": len(rows),
        "statuses": got["statuses"],
    }
    assert got["statuses"] == ["ok", "rejected"]
    openclip = readme_block("train OpenCLIP on the tars")
    got = run_snippet(openclip + OPENCLIP_READ, tmp_path)
    assert got == {
        "shards": len(tars),
        "counted": len(ok_keys),
        "read": len(ok_keys),
        "num_samples": len(ok_keys),
    }


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_in_job_clip_scores_are_of_the_image_as_stored(tmp_path, tiny_model, image_format):
    """One shard through the real worker, without Ray: each row's clip_score is CLIPScore of the
    image decoded from the tar (transformers' full CLIPModel forward, computed here)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from sdfleet.actors.generator import ShardGenerator
    from sdfleet.jobs.plan import Planner
    from sdfleet.jobs.tiny import write_tiny_clip
    from sdfleet.schemas.spec import parse_spec

    clip = write_tiny_clip(tmp_path / "clip")
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS[:3], ["a", "b", "c"])
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        sweep={"seeds": 2},
        output={"image_format": image_format, "quality": 50, "samples_per_shard": 6},
        curation={"clip_model": str(clip)},
    )
    ShardGenerator(Planner(parse_spec(spec)).plan(), cpu_threads=2).run(0)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    model = CLIPModel.from_pretrained(clip, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip)
    ext = "jpg" if image_format == "jpeg" else "webp"
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        stored = {
            m.name[: -len(ext) - 1]: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.name.endswith(f".{ext}")
        }
    assert sorted(stored) == sorted(rows)
    for key, data in stored.items():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            o = model(
                **processor(
                    text=[rows[key]["prompt"]], images=[image], return_tensors="pt", padding=True
                )
            )
        want = float((100 * (o.image_embeds * o.text_embeds).sum()).clamp(min=0))
        assert abs(rows[key]["clip_score"] - want) < 1e-4, (key, rows[key]["clip_score"], want)
        # The tar holds the bytes the row's hash names: scoring reused them, not a second encode.
        assert hashlib.sha256(data).hexdigest() == rows[key]["image_sha256"]
