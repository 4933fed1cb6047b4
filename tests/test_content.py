"""The fingerprint sees content (issue 29, item 2): input files by ETag or size + mtime + footer,
the files rows point at, the checkpoint by a resolved revision; a resume that would mix content is
refused naming what changed, and workers load what the driver resolved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, job_dict, rows_of, run_cli, write_spec
from sdfleet.actors.model_cache import cached_copy
from sdfleet.actors.model_content import model_content, pin_model, verify_content
from sdfleet.schemas.errors import ModelLoadError


def test_local_model_hash_follows_its_files(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = model_content(str(folder))
    assert before.kind == "local" and before.files > 0
    assert model_content(str(folder)).digest == before.digest  # stable while nothing changes
    config = folder / "scheduler" / "scheduler_config.json"
    stat = config.stat()
    # An equal-length edit with the mtime put back: only the bytes of a small file tell.
    text = config.read_text()
    assert "1" in text
    config.write_text(text.replace("1", "2", 1))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.stat().st_size == stat.st_size
    after = model_content(str(folder))
    assert after.digest != before.digest
    # A worker whose node holds another version refuses it, naming the folder.
    with pytest.raises(ModelLoadError, match=str(folder)):
        verify_content(before)
    assert verify_content(after) is None


def test_s3_mirror_is_hashed_by_etags_and_the_node_cache_revalidates(tiny_model, s3, tmp_path):
    uri = f"s3://{s3.bucket}/models/tiny"
    s3.put(str(tiny_model), f"{s3.bucket}/models/tiny", recursive=True)
    first = model_content(uri)
    assert first.kind == "remote" and first.files > 0
    cache = str(tmp_path / "cache")
    copy = cached_copy(uri, cache_root=cache, expected_digest=first.digest)
    config = f"{s3.bucket}/models/tiny/scheduler/scheduler_config.json"
    original = s3.cat_file(config)
    changed = original.replace(b"{", b"{ ", 1)
    s3.pipe(config, changed)
    second = model_content(uri)
    assert second.digest != first.digest
    # A node that holds what the driver resolved keeps using it; one that must copy the mirror
    # now finds something else there: refused, naming it.
    assert cached_copy(uri, cache_root=cache, expected_digest=first.digest) == copy
    with pytest.raises(ModelLoadError, match=f"{uri} changed since the driver planned"):
        cached_copy(uri, cache_root=str(tmp_path / "other-node"), expected_digest=first.digest)
    # Planned anew, the node's copy (made under the same URI) is made again, not reused.
    again = cached_copy(uri, cache_root=cache, expected_digest=second.digest)
    assert again == copy
    assert (copy / "scheduler" / "scheduler_config.json").read_bytes() == changed
    # Put back, the mirror has its first hash again (ETags are the MD5 of the bytes).
    s3.pipe(config, original)
    assert model_content(uri).digest == first.digest


def test_hub_id_resolves_to_a_commit_and_workers_load_it(tiny_model, tmp_path):
    """Offline, from a Hugging Face cache laid out as the hub writes it: refs/main names the newest
    snapshot; the driver resolves to it and the engine loads that commit."""
    cache = tmp_path / "hf"
    repo = cache / "models--acme--tiny"
    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    script = textwrap.dedent(
        f"""
        from sdfleet.actors.engine import Engine
        from sdfleet.actors.model_content import model_content, pin_model
        from sdfleet.schemas.spec import ModelSpec

        content = model_content("acme/tiny")
        assert (content.kind, content.revision) == ("hub", {new!r}), content
        assert model_content("acme/tiny", {old!r}).revision == {old!r}
        model = pin_model(ModelSpec(source="acme/tiny"), content)
        assert model.revision == {new!r}
        engine = Engine(model, device="cpu")
        print("loaded", engine.family.name)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded" in done.stdout


def test_an_unpinned_plan_loads_the_model_as_given(tiny_model):
    from sdfleet.schemas.spec import ModelSpec

    model = ModelSpec(source=str(tiny_model))
    assert pin_model(model, None) is model


def test_the_files_rows_point_at_are_fingerprinted(tmp_path):
    """Image-to-image rows naming image files: rewriting one changes the hash; the row table (and
    so the input file's own identity) is untouched."""
    from PIL import Image

    from sdfleet.jobs.content import referenced_images_digest
    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.spec import parse_spec

    folder = tmp_path / "in"
    (folder / "img").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(folder / "img" / f"{i}.png")
    table = pa.table(
        {
            "prompt_id": ["0", "1", "2"],
            "prompt": ["a", "b", "c"],
            "image": ["img/0.png", "img/1.png", "img/0.png"],
        }
    )
    pq.write_table(table, folder / "rows.parquet")
    spec = parse_spec(
        job_dict(
            "unused/model",
            folder,
            tmp_path / "out",
            model={"task": "image-to-image"},
            input={"image_column": "image"},
        )
    )
    plan = Planner(spec).plan()
    digest, count = referenced_images_digest(plan)
    assert digest is not None and count == 2
    assert referenced_images_digest(plan) == (digest, 2)
    Image.new("RGB", (16, 16), (0, 0, 200)).save(folder / "img" / "1.png")
    assert referenced_images_digest(plan)[0] != digest


def test_input_files_on_s3_are_known_by_their_etag(s3, tmp_path):
    """An equal-size rewrite on S3 changes the file's identity, and the changes name the file."""
    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.content import JobContent, content_changes
    from sdfleet.schemas.spec import parse_spec

    local = tmp_path / "p.parquet"
    uri = f"s3://{s3.bucket}/in/p.parquet"
    spec = parse_spec(job_dict("unused/model", uri, f"s3://{s3.bucket}/out"))

    def identity(prompts) -> str:
        _prompts(local, prompts)
        s3.put(str(local), uri)
        [f] = Planner(spec).plan().files
        return f.content

    before = identity(["a bowl of ramen"])
    after = identity(["a bowl of rAmen"])
    assert before.startswith("etag:") and after.startswith("etag:") and before != after
    was, now = JobContent({uri: before}), JobContent({uri: after})
    [change] = content_changes(was.to_json(), now.to_json())
    assert change.startswith(f"input file {uri} changed content")
    assert content_changes(was.to_json(), was.to_json()) == []


def _prompts(path, prompts) -> None:
    """Uncompressed, so an equal-length edit keeps the file's size."""
    table = pa.table({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts})
    pq.write_table(table, path, compression="none")


def test_a_resume_that_would_mix_content_is_refused(tiny_model, ray_cluster, s3, tmp_path):
    """A job stopped after its first shards; its input rewritten with the same size: refused,
    naming the file, whatever --set says. Put back, a changed model mirror: refused, naming the
    model. Both put back: the resume completes, every row carrying the model's hash."""
    # 1. A job on a local input and an s3:// model mirror, stopped by its budget after a shard.
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(6)]
    source = tmp_path / "in" / "prompts.parquet"
    source.parent.mkdir()
    _prompts(source, prompts)
    mirror = f"s3://{s3.bucket}/models/tiny"
    s3.put(str(tiny_model), f"{s3.bucket}/models/tiny", recursive=True)
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path,
        job_dict(
            mirror,
            source,
            out,
            generation={"num_inference_steps": 2, "width": 64, "height": 64},
            output={"samples_per_shard": 1},
            resources={"max_workers": 1, "budget_usd": 0.01, "gpu_hour_usd": 1000.0},
        ),
    )
    run = ("run", str(spec), "--address", ray_cluster.address, "--no-progress")
    first = run_cli(*run)
    assert first.returncode == 2, first.stderr[-3000:]
    done = len(list(out.glob("*_stats.json")))
    assert 1 <= done < len(prompts)
    job = json.loads((out / "_job.json").read_text())
    assert job["content"]["input_files"][str(source)].startswith(f"size:{source.stat().st_size}:")

    # 2. The input rewritten in place, same size: refused, naming the file; --set cannot help.
    stat = source.stat()
    _prompts(source, [p.replace("dusk", "dawn") for p in prompts])
    assert source.stat().st_size == stat.st_size
    refused = run_cli(*run, "--set", "resources.budget_usd=100")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"input file {source} changed content" in refused.stderr
    assert len(list(out.glob("*_stats.json"))) == done

    # 3. Put back (bytes and mtime); the model mirror changed instead: refused, naming it.
    _prompts(source, prompts)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    config = f"{s3.bucket}/models/tiny/unet/config.json"
    original = s3.cat_file(config)
    s3.pipe(config, original.replace(b"{", b"{ ", 1))
    refused = run_cli(*run, "--set", "resources.budget_usd=100")
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"model.source {mirror} changed content" in refused.stderr
    assert f"input file {source}" not in refused.stderr

    # 4. Both as they were: the job resumes and completes; each row names the model's hash.
    s3.pipe(config, original)
    resumed = run_cli(*run, "--set", "resources.budget_usd=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = rows_of(str(out))
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    assert {r["model_hash"] for r in rows} == {job["content"]["models"]["model.source"]["digest"]}


def test_a_job_recorded_without_content_resumes_as_it_was(tiny_model, tmp_path):
    """_job.json from an sdfleet before content was recorded: the same spec and input resume (its
    fingerprint had no content), unpinned; nothing is refused for lack of a record."""
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.jobs.sink import job_record
    from sdfleet.schemas.spec import load_spec

    source = tmp_path / "in" / "prompts.parquet"
    source.parent.mkdir()
    _prompts(source, ["a red fox in the snow"])
    out = tmp_path / "out"
    spec = load_spec(write_spec(tmp_path, job_dict(tiny_model, source, out)))
    plan = Preflight(spec).check().plan
    assert plan.content is not None
    old = {
        **job_record(plan),
        "content": None,
        "fingerprint": plan.fingerprint_without_content,
    }
    out.mkdir()
    (out / "_job.json").write_text(json.dumps(old))
    checked = Preflight(spec).check()
    assert checked.verdict.action == "resume" and checked.verdict.without_content
    assert checked.plan.content is None
    assert checked.plan.fingerprint == old["fingerprint"]


def test_a_refiner_and_a_vae_are_known_by_content_too(tiny_sdxl, tmp_path):
    """Every checkpoint the job loads joins its content, keyed by the spec key naming it: a
    refiner changed between two runs is named as model.refiner.source; the VAE override as
    model.vae; workers pin each one as the driver resolved it."""
    from sdfleet.actors.model_content import pin_models
    from sdfleet.jobs.content import resolve_content
    from sdfleet.jobs.plan import Planner
    from sdfleet.jobs.tiny_sdxl import TINY_SDXL_VAE, write_tiny_sdxl_vae
    from sdfleet.schemas.content import content_changes
    from sdfleet.schemas.spec import parse_spec

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl["refiner"], refiner)
    vae = write_tiny_sdxl_vae(tmp_path / TINY_SDXL_VAE)
    _prompts(tmp_path / "p.parquet", ["a bowl of ramen"])
    data = job_dict(str(tiny_sdxl["base"]), str(tmp_path / "p.parquet"), str(tmp_path / "out"))
    data["model"].update(refiner={"source": str(refiner)}, vae=str(vae))
    spec = parse_spec(data)

    before = resolve_content(Planner(spec).plan())
    assert set(before.models) == {"model.source", "model.refiner.source", "model.vae"}
    pinned = pin_models(spec.model, before)  # local folders: verified on this node, not repinned
    assert (pinned.refiner.source, pinned.vae) == (str(refiner), str(vae))

    config = refiner / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("\n", " \n", 1))
    after = resolve_content(Planner(spec).plan())
    [change] = content_changes(before.to_json(), after.to_json())
    assert change.startswith(f"model.refiner.source {refiner} changed content")
    with pytest.raises(ModelLoadError, match="not what the driver planned with"):
        pin_models(spec.model, before)
