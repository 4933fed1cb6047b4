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

from helpers import TINY_GENERATION, job_dict, rows_of, run_cli, write_prompts, write_spec


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from sdfleet.jobs.tiny import write_tiny_aesthetic_head, write_tiny_clip, write_tiny_nsfw_head

    root = tmp_path_factory.mktemp("curation")
    return {
        "clip": write_tiny_clip(root / "clip"),
        "aesthetic": write_tiny_aesthetic_head(root / "a.safetensors"),
        "nsfw": write_tiny_nsfw_head(root / "n.safetensors"),
    }


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


@pytest.mark.slow
def test_job_rows_carry_the_scores_and_writes_the_embeddings_an_index_reads(
    tmp_path, tiny_model, scorers, ray_cluster
):
    import faiss
    import pyarrow.parquet as pq
    import torch
    from transformers import CLIPModel, CLIPProcessor

    prompts = [
        "a lighthouse at dusk",
        "a red fox in the snow",
        "a bowl of ramen",
        "a city at night, rain",
    ]
    write_prompts(tmp_path / "in" / "p.parquet", prompts)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        sweep={"seeds": 2},
        output={"image_format": "png", "samples_per_shard": 4},
        resources={"batch_size": 2},
        curation={
            "clip_model": str(scorers["clip"]),
            "aesthetic_model": str(scorers["aesthetic"]),
            "nsfw_model": str(scorers["nsfw"]),
            "save_embeddings": True,
        },
    )
    write_spec(tmp_path, spec, "job.yaml")
    done = run_cli(
        "run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted(rows_of(str(tmp_path / "out")), key=lambda r: r["key"])
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)

    images = {}
    for tar_path in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            images.update(
                {
                    m.name[:-4]: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                    for m in tar.getmembers()
                    if m.name.endswith(".png")
                }
            )
    model = CLIPModel.from_pretrained(scorers["clip"], use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(scorers["clip"])
    with torch.no_grad():
        out = model(
            **processor(
                text=[r["prompt"] for r in rows],
                images=[images[r["key"]] for r in rows],
                return_tensors="pt",
                padding=True,
            )
        )
    # CLIPModel's forward returns normalized embeddings: CLIPScore is 100 x their dot, clipped at 0.
    expected_clip = (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp(min=0).numpy()
    embeds = out.image_embeds.numpy()
    got = {k: np.array([r[k] for r in rows]) for k in ("clip_score", "aesthetic_score", "punsafe")}
    np.testing.assert_allclose(got["clip_score"], expected_clip, atol=1e-3)
    np.testing.assert_allclose(
        got["aesthetic_score"], numpy_head(scorers["aesthetic"], embeds), atol=1e-4
    )
    np.testing.assert_allclose(got["punsafe"], numpy_head(scorers["nsfw"], embeds), atol=1e-4)
    assert len(set(got["clip_score"].round(3))) == 8  # a score per image, not one per shard
    assert got["punsafe"].min() >= 0 and got["punsafe"].max() <= 1

    stats = yaml.safe_load((tmp_path / "out" / "00000_stats.json").read_text())
    assert set(stats["curation_models_sha256"]) == {"clip_model", "aesthetic_model", "nsfw_model"}
    assert stats["stage_seconds"]["curate"] > 0

    # The embeddings, in clip-retrieval's layout, committed with their shards and in tar order.
    out = tmp_path / "out"
    assert {"img_emb/img_emb_00000.npy", "metadata/metadata_00000.parquet"} <= set(stats["files"])
    keys, matrices = [], []
    for shard in ("00000", "00001"):
        with tarfile.open(out / f"{shard}.tar") as tar:
            in_tar = [n[:-4] for n in tar.getnames() if n.endswith(".png")]
        meta = pq.read_table(out / "metadata" / f"metadata_{shard}.parquet").to_pylist()
        assert [m["key"] for m in meta] == in_tar
        matrix = np.load(out / "img_emb" / f"img_emb_{shard}.npy")
        assert matrix.dtype == np.float16 and matrix.shape == (len(in_tar), 16)
        keys += in_tar
        matrices.append(matrix)
    by_key = {r["key"]: r for r in rows}
    assert [by_key[k]["prompt"] for k in keys] == [
        m["caption"]
        for s in ("00000", "00001")
        for m in pq.read_table(out / f"metadata/metadata_{s}.parquet").to_pylist()
    ]
    embeddings = np.concatenate(matrices).astype(np.float32)
    np.testing.assert_allclose(
        embeddings, embeds[[[r["key"] for r in rows].index(k) for k in keys]], atol=2e-3
    )
    # An exact index over them finds each image's own key first.
    index = faiss.IndexFlatL2(embeddings.shape[1])
    index.add(embeddings)
    _, nearest = index.search(embeddings, 2)
    assert [keys[i] for i in nearest[:, 0]] == keys


def test_heads_are_safetensors_of_the_right_kind_and_width(tmp_path, scorers):
    from sdfleet.actors.curation import Curator
    from sdfleet.jobs.tiny import write_tiny_aesthetic_head
    from sdfleet.schemas.curation_spec import CurationSpec
    from sdfleet.schemas.errors import ModelLoadError

    wide = write_tiny_aesthetic_head(tmp_path / "wide.safetensors", embedding_size=768)
    pickle = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    pickle.write_bytes(b"\x80\x04not loaded")
    cases = [
        (
            CurationSpec(clip_model=str(scorers["clip"]), aesthetic_model=str(wide)),
            "takes 768-wide embeddings, but curation.clip_model's are 16",
        ),
        (
            CurationSpec(clip_model=str(scorers["clip"]), aesthetic_model=str(scorers["nsfw"])),
            "says it is a 'nsfw' head, not 'aesthetic'",
        ),
        (
            CurationSpec(clip_model=str(scorers["clip"]), nsfw_model=str(pickle)),
            "is not a .safetensors file; sdfleet loads heads from safetensors only",
        ),
    ]
    for spec, message in cases:
        with pytest.raises(ModelLoadError, match="curation") as e:
            Curator(spec, "cpu")
        assert message in str(e.value)


def test_a_head_without_its_clip_model_is_a_spec_error():
    from sdfleet.schemas.errors import SpecError
    from sdfleet.schemas.spec import parse_spec

    with pytest.raises(SpecError, match=r"curation.aesthetic_model reads CLIP image embeddings"):
        parse_spec(
            {
                "input": {"uri": "x"},
                "output": {"uri": "y"},
                "curation": {"aesthetic_model": "a.safetensors"},
            }
        )


def test_plan_refuses_a_pickled_head_and_a_missing_clip_model(tmp_path, tiny_model, scorers):
    write_prompts(tmp_path / "in" / "p.parquet", ["a"])
    for curation, message in [
        (
            {
                "clip_model": str(scorers["clip"]),
                "aesthetic_model": str(tmp_path / "ava1-l14-linearMSE.pth"),
            },
            "curation.aesthetic_model="
            + str(tmp_path / "ava1-l14-linearMSE.pth")
            + " is not a .safetensors file",
        ),
        (
            {"clip_model": str(tmp_path / "no-clip")},
            f"curation.clip_model {tmp_path / 'no-clip'} does not exist",
        ),
    ]:
        spec = job_dict(tiny_model, tmp_path / "in", tmp_path / "out", curation=curation)
        write_spec(tmp_path, spec, "job.yaml")
        out = run_cli("plan", str(tmp_path / "job.yaml"))
        assert out.returncode == 1 and message in out.stderr, out.stderr


# ---------------------------------------------------------------------------------- best-of-N


def reference_candidates(tiny_model, clip_dir, prompts, ids, m):
    """Every candidate slot of every prompt made alone with plain diffusers and scored with
    transformers' CLIPModel: {(prompt_id, slot): (clip_score, normalized embedding)}."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    from sdfleet.schemas.samples import derive_seed

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, use_safetensors=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    out = {}
    for prompt, pid in zip(prompts, ids):
        for slot in range(m):
            image = pipe(
                prompt,
                num_inference_steps=2,
                guidance_scale=7.5,
                width=64,
                height=64,
                generator=torch.Generator("cpu").manual_seed(derive_seed(0, pid, slot)),
            ).images[0]
            with torch.no_grad():
                o = model(
                    **processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
                )
            out[pid, slot] = (
                float((100 * (o.image_embeds * o.text_embeds).sum()).clamp(min=0)),
                o.image_embeds[0].numpy(),
            )
    return out


def between(values, low_quantile, high_quantile=1.0):
    """A threshold in the widest gap of the sorted values between two quantiles, far from all of them."""
    v = sorted(values)
    start, end = (
        int(len(v) * low_quantile),
        max(int(len(v) * high_quantile), int(len(v) * low_quantile) + 1),
    )
    i = max(range(start, min(end, len(v) - 1)), key=lambda j: v[j + 1] - v[j])
    return (v[i] + v[i + 1]) / 2, v[i + 1] - v[i]


def expected_statuses(ref, ids, k, m, min_clip, dedup):
    """The first k passing candidates in slot order per prompt, computed here from the reference."""
    want = {}
    for pid in ids:
        kept = []
        for slot in range(m):
            if len(kept) == k:
                want[pid, slot] = "skipped"
                continue
            score, emb = ref[pid, slot]
            if score < min_clip:
                want[pid, slot] = "rejected"
            elif any(float(emb @ e) >= dedup for e in kept):
                want[pid, slot] = "duplicate"
            else:
                want[pid, slot] = "ok"
                kept.append(emb)
    return want


@pytest.mark.slow
def test_best_of_n_keeps_the_first_k_passing_candidates_in_seed_order(
    tmp_path, tiny_model, scorers, ray_cluster
):
    import itertools

    prompts = [
        "a lighthouse at dusk",
        "a red fox in the snow",
        "a bowl of ramen",
        "a city at night, rain",
    ]
    ids = [f"p{i}" for i in range(4)]
    k, m = 2, 6
    ref = reference_candidates(tiny_model, scorers["clip"], prompts, ids, m)
    # The tiny CLIP scores some prompts high and some low whatever the seed: a gate inside the low
    # prompts' range makes them need more rounds, and the dedup threshold inside the cosines of
    # kept-prompt pairs makes some duplicates.
    scores = {pid: [ref[pid, s][0] for s in range(m)] for pid in ids}
    low = sorted(scores, key=lambda pid: max(scores[pid]))[:2]
    min_clip, clip_gap = between([v for pid in low for v in scores[pid]], 0.35, 0.65)
    cosines = sorted(
        float(ref[p, a][1] @ ref[p, b][1])
        for p in ids
        for a, b in itertools.combinations(range(m), 2)
    )
    # Just under the closest first pair of a high prompt, whose slot 0 is kept: its slot 1 is then a duplicate.
    closest = max(float(ref[p, 0][1] @ ref[p, 1][1]) for p in ids if p not in low)
    below = max(c for c in cosines if c < closest)
    dedup, dedup_gap = (closest + below) / 2, closest - below
    assert (
        clip_gap > 0.2 and dedup_gap > 1e-5
    )  # thresholds far from every score, so batching cannot flip one
    want = expected_statuses(ref, ids, k, m, min_clip, dedup)

    write_prompts(tmp_path / "in" / "p.parquet", prompts, ids)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        output={"image_format": "png", "samples_per_shard": 12},
        resources={"batch_size": 2},
        curation={
            "clip_model": str(scorers["clip"]),
            "min_clip_score": min_clip,
            "dedup_threshold": dedup,
            "images_per_prompt": k,
            "max_candidates": m,
        },
    )
    write_spec(tmp_path, spec, "job.yaml")
    done = run_cli(
        "run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = rows_of(str(tmp_path / "out"))
    assert len(rows) == len(ids) * m  # every planned slot has exactly one row
    got = {(r["prompt_id"], r["candidate"]): r for r in rows}
    assert {key: r["status"] for key, r in got.items()} == want
    assert set(want.values()) == {"ok", "rejected", "duplicate", "skipped"}, want
    # Some prompt needed a later round: a slot past the first k kept.
    assert any(want[pid, s] == "ok" for pid in ids for s in range(k, m))
    for (pid, _slot), r in got.items():
        if r["status"] == "rejected":
            assert r["rejected_by"] == "min_clip_score" and r["clip_score"] < min_clip
        if r["status"] == "duplicate":
            assert got[pid, int(r["duplicate_of"][-4:]) % m]["status"] == "ok"
        if r["status"] == "skipped":
            assert r["clip_score"] is None and r["gen_seconds"] is None and r["seed"] is not None
    for pid in ids:
        assert sum(got[pid, s]["status"] == "ok" for s in range(m)) <= k
    in_tars = set()
    for tar_path in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            in_tars |= {n[:-4] for n in tar.getnames() if n.endswith(".png")}
    assert in_tars == {r["key"] for r in rows if r["status"] == "ok"}
    stats = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "out").glob("*_stats.json"))]
    assert sum(s["skipped"] for s in stats) == list(want.values()).count("skipped")
    assert sum(s["rejected"] for s in stats) == list(want.values()).count("rejected")
    # status, the card and the gallery say it too.
    counts = {v: list(want.values()).count(v) for v in ("rejected", "duplicate", "skipped")}
    status = run_cli("status", str(tmp_path / "out"))
    assert ", ".join(f"{n} {v}" for v, n in counts.items()) in status.stdout, status.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| candidate slots not needed (not generated) | {counts['skipped']} |" in card
    statuses = list(want.values())
    gated = len(statuses) - counts["skipped"]
    passed = gated - counts["rejected"]
    assert (
        f"| `min_clip_score` | {min_clip} | {counts['rejected']} | {passed / gated:.1%} |" in card
    ), card
    short = sum(sum(want[pid, s] == "ok" for s in range(m)) < k for pid in ids)
    kept = statuses.count("ok")
    assert f"| all | {gated} | {kept} | {kept / gated:.1%} | {short} of {len(ids)} |" in card, card
    html = run_cli("preview", str(tmp_path / "out"), "--html")
    assert html.returncode == 0, html.stderr[-2000:]
    page = (tmp_path / "out" / "preview" / "index.html").read_text()
    assert 'value="duplicate"' in page and "rejected: min_clip_score" in page


@pytest.mark.slow
def test_best_of_n_after_a_driver_sigkill_reruns_into_the_same_bytes(
    tmp_path, tiny_model, scorers, ray_cluster
):
    """The rounds depend on the scores, so a rerun must make the same choices: a driver killed
    after its first commit, then rerun, gives the tars an uninterrupted run gives, byte for byte."""
    import signal

    from clusters import actor_pids
    from helpers import assert_exactly_once, committed, same_dataset, start_cli, wait_for

    prompts = [f"a landscape, variation {i}" for i in range(8)]
    ids = [f"p{i}" for i in range(8)]
    k, m = 1, 3
    ref = reference_candidates(tiny_model, scorers["clip"], prompts, ids, m)
    # A gate in the middle of the scores: some prompts keep their first candidate, some need more rounds.
    min_clip, _ = between([score for score, _ in ref.values()], 0.3, 0.7)
    want = expected_statuses(ref, ids, k, m, min_clip, dedup=2.0)
    assert {"ok", "rejected", "skipped"} <= set(want.values())
    write_prompts(tmp_path / "in" / "p.parquet", prompts, ids)

    def spec(out):
        spec = job_dict(
            tiny_model,
            tmp_path / "in",
            tmp_path / out,
            generation=TINY_GENERATION,
            output={"image_format": "png", "samples_per_shard": m},
            resources={"batch_size": 2},
            curation={
                "clip_model": str(scorers["clip"]),
                "min_clip_score": min_clip,
                "images_per_prompt": k,
                "max_candidates": m,
                "save_embeddings": True,
            },
        )
        return str(write_spec(tmp_path, spec, f"{out}.yaml"))

    done = run_cli("run", spec("uninterrupted"), "--address", ray_cluster.address, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = str(tmp_path / "killed")
    proc = start_cli("run", spec("killed"), "--address", ray_cluster.address, "--no-progress")
    wait_for(lambda: committed(killed), 120, "a first committed shard")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(committed(killed)) < len(ids), "the job ended before the kill: nothing was resumed"
    wait_for(lambda: not actor_pids(ray_cluster), 60, "the dead driver's actors to exit", poll=0.5)
    again = run_cli("run", spec("killed"), "--address", ray_cluster.address, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]

    rows = assert_exactly_once(
        killed, samples=len(ids) * m, shards=len(ids), images=list(want.values()).count("ok")
    )
    assert {(r["prompt_id"], r["candidate"]): r["status"] for r in rows} == want
    same_dataset(str(tmp_path / "uninterrupted"), killed)
    for shard in range(len(ids)):
        name = f"img_emb/img_emb_{shard:05d}.npy"
        assert (tmp_path / "killed" / name).read_bytes() == (
            tmp_path / "uninterrupted" / name
        ).read_bytes()


@pytest.mark.slow
def test_laion_clip_nsfw_as_the_safety_detector_reads_curations_embedding(
    tmp_path, tiny_model, scorers, ray_cluster
):
    """safety.detector: laion-clip-nsfw flags on the NSFW head's punsafe, from the same embedding
    curation computes: its nsfw_score is exactly the row's punsafe when curation runs that head too,
    and matches the head applied here to transformers' own embedding of a plain-diffusers image."""
    prompts = [
        "a lighthouse at dusk",
        "a red fox in the snow",
        "a bowl of ramen",
        "a city at night, rain",
    ]
    ids = [f"p{i}" for i in range(4)]
    ref = reference_candidates(tiny_model, scorers["clip"], prompts, ids, 2)
    punsafe = {
        key: float(numpy_head(scorers["nsfw"], emb[None])[0]) for key, (_, emb) in ref.items()
    }
    threshold, gap = between(list(punsafe.values()), 0.3, 0.7)
    assert gap > 1e-4
    write_prompts(tmp_path / "in" / "p.parquet", prompts, ids)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        sweep={"seeds": 2},
        output={"image_format": "png", "samples_per_shard": 4},
        safety={
            "detector": "laion-clip-nsfw",
            "model": str(scorers["nsfw"]),
            "threshold": threshold,
            "action": "drop",
        },
        resources={"batch_size": 2},
        curation={"clip_model": str(scorers["clip"]), "nsfw_model": str(scorers["nsfw"])},
    )
    write_spec(tmp_path, spec, "job.yaml")
    done = run_cli(
        "run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(str(tmp_path / "out"))
    assert len(rows) == 8
    for r in rows:
        slot = 0 if r["seed"] == ref_seed(r["prompt_id"], 0) else 1
        assert r["nsfw_score"] == r["punsafe"]
        assert r["nsfw_score"] == pytest.approx(punsafe[r["prompt_id"], slot], abs=1e-4)
        assert r["status"] == ("filtered" if punsafe[r["prompt_id"], slot] >= threshold else "ok")
        assert {s["label"] for s in r["nsfw_scores"]} == {"unsafe", "safe"} and r[
            "safety_detector"
        ] == "laion-clip-nsfw"
    assert {r["status"] for r in rows} == {"ok", "filtered"}


def ref_seed(prompt_id, slot):
    from sdfleet.schemas.samples import derive_seed

    return derive_seed(0, prompt_id, slot)


def test_laion_clip_nsfw_needs_the_clip_model_and_a_safetensors_head(tmp_path, tiny_model, scorers):
    from sdfleet.schemas.errors import SpecError
    from sdfleet.schemas.spec import parse_spec

    with pytest.raises(
        SpecError, match=r"safety.detector=laion-clip-nsfw reads the CLIP image embedding"
    ):
        parse_spec(
            {
                "input": {"uri": "x"},
                "output": {"uri": "y"},
                "safety": {"detector": "laion-clip-nsfw", "model": "n.safetensors"},
            }
        )
    write_prompts(tmp_path / "in" / "p.parquet", ["a"])
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        curation={"clip_model": str(scorers["clip"])},
        safety={
            "detector": "laion-clip-nsfw",
            "model": str(tmp_path / "clip_autokeras_nsfw_b32.zip"),
        },
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert (
        out.returncode == 1 and "laion-clip-nsfw loads its head from safetensors only" in out.stderr
    ), out.stderr


def test_tally_counts_gates_and_each_sweep_point_apart():
    from sdfleet.actors.curation import tally

    def row(pid, g, status, rejected_by=None):
        return {"prompt_id": pid, "guidance_scale": g, "status": status, "rejected_by": rejected_by}

    rows = [
        row("a", 3.0, "ok"),
        row("a", 3.0, "skipped"),
        row("a", 7.5, "rejected", "min_clip_score,max_punsafe"),
        row("a", 7.5, "duplicate"),
        row("b", 3.0, "filtered"),
        row("b", 3.0, "rejected", "max_punsafe"),
        row("b", 7.5, "ok"),
        row("b", 7.5, "failed"),
    ]
    got = tally(rows, ["guidance_scale"], images_per_prompt=1)
    assert got["gated"] == 5  # not filtered (safety), failed (never made) or skipped
    assert got["gate_failures"] == {"max_punsafe": 2, "min_clip_score": 1}
    assert got["by_sweep_point"] == {
        "guidance_scale=3.0": {"generated": 3, "ok": 1, "prompts": 2, "short": 1},
        "guidance_scale=7.5": {"generated": 3, "ok": 1, "prompts": 2, "short": 1},
    }
