"""Safety detectors through their real loaders, and every action on real written output.

The tiny detectors are driven to flag everything or nothing through their last layer's bias (or the
CLIP checker's thresholds), so each action's effect on the tars and rows is checked exactly.
"""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import TINY_GENERATION, job_dict, run_cli, spec_dict, write_prompts, write_spec
from sdfleet.actors.generator import ShardGenerator
from sdfleet.actors.model_cache import weights_sha256
from sdfleet.actors.safety import UnsafeModelError, load_detector
from sdfleet.jobs.plan import Planner
from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.spec import SafetySpec, parse_spec

DETECTORS = ("nsfw-detector", "clip-checker", "hf-classifier")
PROMPTS = ["a quiet harbour at dusk", "a bowl of cherries", "a fox in the snow"]


@pytest.fixture(scope="session")
def tiny_detectors(tmp_path_factory):
    from sdfleet.jobs.tiny import (
        write_tiny_clip_checker,
        write_tiny_hf_classifier,
        write_tiny_nsfw_model,
    )

    root = tmp_path_factory.mktemp("detectors")
    writers = {
        "nsfw-detector": (write_tiny_nsfw_model, "nsfw-{}.h5"),
        "clip-checker": (write_tiny_clip_checker, "clip-{}"),
        "hf-classifier": (write_tiny_hf_classifier, "hf-{}"),
    }
    return {
        (det, flag): str(fn(root / name.format(flag), flag))
        for det, (fn, name) in writers.items()
        for flag in ("nothing", "everything")
    }


def random_images(n=4):
    return [np.random.RandomState(i).randint(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("detector", DETECTORS)
def test_detectors_score_through_their_own_loaders(detector, tiny_detectors):
    safe = load_detector(
        SafetySpec(detector=detector, model=tiny_detectors[detector, "nothing"]), "cpu"
    )
    unsafe = load_detector(
        SafetySpec(detector=detector, model=tiny_detectors[detector, "everything"]), "cpu"
    )
    for score in safe.score(random_images()):
        assert 0.0 <= score.nsfw_score < 0.5 and score.scores
    for score in unsafe.score(random_images()):
        assert 0.5 <= score.nsfw_score <= 1.0
    assert safe.model_sha256 != unsafe.model_sha256 and len(safe.model_sha256) == 64


def test_nsfw_score_sums_the_chosen_classes(tiny_detectors):
    det = load_detector(
        SafetySpec(detector="nsfw-detector", model=tiny_detectors["nsfw-detector", "everything"]),
        "cpu",
    )
    score = det.score(random_images(1))[0]
    assert set(score.scores) == {"drawings", "hentai", "neutral", "porn", "sexy"}
    assert score.nsfw_score == pytest.approx(
        score.scores["porn"] + score.scores["hentai"] + score.scores["sexy"]
    )
    assert score.top_class(det.unsafe_classes) == "porn"
    only_sexy = load_detector(
        SafetySpec(
            detector="nsfw-detector",
            unsafe_classes=["sexy"],
            model=tiny_detectors["nsfw-detector", "everything"],
        ),
        "cpu",
    )
    assert only_sexy.score(random_images(1))[0].nsfw_score < 0.5  # the model is sure it is "porn"


def test_nsfw_detector_scores_are_the_packages_own(tiny_detectors):
    """sdfleet calls the model once per batch (predict_on_batch) instead of the package's classify_nd
    (predict, which builds an input pipeline per call): the per-class scores must be classify_nd's."""
    from nsfw_detector import predict

    det = load_detector(
        SafetySpec(detector="nsfw-detector", model=tiny_detectors["nsfw-detector", "nothing"]),
        "cpu",
        cpu_threads=1,
    )
    images = random_images(5)
    resized = np.stack(
        [np.asarray(Image.fromarray(im).resize((224, 224), Image.NEAREST)) for im in images]
    )
    expected = predict.classify_nd(det.model, resized.astype(np.float32) / 255.0)
    got = [s.scores for s in det.score(images)]
    assert [list(g) for g in got] == [list(e) for e in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-6)


def test_bad_safety_settings_are_named(tiny_detectors):
    with pytest.raises(
        ValueError, match=r"safety.unsafe_classes has 'nude'.*drawings, hentai, neutral, porn, sexy"
    ):
        load_detector(
            SafetySpec(
                detector="nsfw-detector",
                unsafe_classes=["nude"],
                model=tiny_detectors["nsfw-detector", "nothing"],
            ),
            "cpu",
        )
    with pytest.raises(SpecError, match=r"safety.detector='clip-checker' needs safety.model"):
        SafetySpec(detector="clip-checker").check_runnable()
    with pytest.raises(SpecError, match=r"safety.unsafe_classes"):
        parse_spec(
            {"input": {"uri": "x"}, "output": {"uri": "y"}, "safety": {"unsafe_classes": []}}
        )


def test_weights_hash_is_stable_and_content_based(tiny_detectors, tmp_path):
    import shutil

    src = tiny_detectors["hf-classifier", "nothing"]
    shutil.copytree(src, tmp_path / "copy")
    assert weights_sha256(src) == weights_sha256(tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_text(
        (tmp_path / "copy" / "config.json").read_text() + " "
    )
    assert weights_sha256(src) != weights_sha256(tmp_path / "copy")


# ------------------------------------------------------------------------------------ hostile weights
# tf-keras' legacy loaders ignore safe_mode: a Lambda layer's bytecode runs inside load_model
# (CVE-2025-9905). These models write MARKER when their code runs, once armed by ARMED in the
# environment (so that building them here runs nothing).

ARMED = "SDFLEET_TEST_MARKER"


def _runs_code(t):
    import os
    import pathlib

    if "SDFLEET_TEST_MARKER" in os.environ:
        pathlib.Path(os.environ["SDFLEET_TEST_MARKER"]).write_text("code from the weights ran")
    return t


def hostile_keras_model(path, kind: str) -> str:
    import os

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    keras = tf.keras
    inputs = keras.Input((224, 224, 3))
    if kind == "custom-class":

        class Sneaky(keras.layers.Layer):
            def call(self, x):
                return x

        x = Sneaky()(inputs)
    elif kind == "nested-lambda":
        inner_in = keras.Input((224, 224, 3))
        x = keras.Model(inner_in, keras.layers.Lambda(_runs_code)(inner_in), name="inner")(inputs)
    else:  # "lambda", "savedmodel-lambda"
        x = keras.layers.Lambda(_runs_code)(inputs)
    x = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, x)
    if kind == "savedmodel-lambda":
        model.save(str(path), save_format="tf")
    else:
        model.save(str(path), save_format="h5")
    return str(path)


@pytest.mark.parametrize(
    "kind, named",
    [
        ("lambda", r"layer 'model(_\d+)?/lambda(_\d+)?' is a Lambda layer"),
        ("nested-lambda", r"layer 'model(_\d+)?/inner/lambda(_\d+)?' is a Lambda layer"),
        ("custom-class", r"is of class 'Sneaky', which is not one of Keras' built-in classes"),
        ("savedmodel-lambda", r"is a Lambda layer"),
    ],
)
def test_keras_weights_that_would_run_code_are_refused_before_loading(
    kind, named, tmp_path, monkeypatch
):
    import subprocess
    import sys

    path = hostile_keras_model(
        tmp_path / ("model" if kind.startswith("savedmodel") else "model.h5"), kind
    )
    marker = tmp_path / "ran"
    monkeypatch.setenv(ARMED, str(marker))
    with pytest.raises(UnsafeModelError, match=named):
        load_detector(SafetySpec(detector="nsfw-detector", model=path), "cpu")
    assert not marker.exists()
    if kind == "lambda":  # the control: the package's own loader does run it
        code = "from nsfw_detector import predict; import sys; predict.load_model(sys.argv[1])"
        subprocess.run(
            [sys.executable, "-c", code, path],
            capture_output=True,
            timeout=300,
            env={**__import__("os").environ, "TF_USE_LEGACY_KERAS": "1"},
        )
        assert marker.read_text() == "code from the weights ran"


def test_pinned_weights_load_and_other_weights_are_refused(tiny_detectors):
    path = tiny_detectors["nsfw-detector", "nothing"]
    pinned = weights_sha256(path)
    assert load_detector(
        SafetySpec(detector="nsfw-detector", model=path, model_sha256=pinned), "cpu"
    )
    other = tiny_detectors["nsfw-detector", "everything"]
    with pytest.raises(
        UnsafeModelError, match=f"has sha256 {weights_sha256(other)}, not the pinned"
    ):
        load_detector(SafetySpec(detector="nsfw-detector", model=other, model_sha256=pinned), "cpu")


# ------------------------------------------------------------------------------------ actions


def generate_shard(tmp_path, tiny_model, safety: dict, name: str):
    """Run one shard (3 prompts x 1 seed + 1 seed) through the real worker, without Ray."""
    if not (tmp_path / "in" / "p.parquet").exists():
        write_prompts(tmp_path / "in" / "p.parquet", PROMPTS)
    spec = parse_spec(
        job_dict(
            tiny_model,
            tmp_path / "in",
            tmp_path / name,
            model={"scheduler": "EulerDiscreteScheduler"},
            generation=TINY_GENERATION,
            sweep={"seeds": 2},
            output={"image_format": "png", "samples_per_shard": 10},
            safety=safety,
            resources={"batch_size": 4},
        )
    )
    stats = ShardGenerator(Planner(spec).plan(), cpu_threads=2).run(0).model_dump()
    out = tmp_path / name
    tar = out / "00000.tar"  # none for a shard that kept no image
    return (
        stats,
        pq.read_table(out / "00000.parquet").to_pylist(),
        (tar_images(tar) if tar.exists() else None),
    )


def tar_images(path):
    with tarfile.open(path) as tar:
        return {
            m.name.split(".")[0]: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.name.endswith(".png")
        }


@pytest.fixture(scope="module")
def none_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("none")
    return tmp, generate_shard(tmp, tiny_model, {"detector": "none"}, "none")


@pytest.mark.parametrize("detector", DETECTORS)
def test_drop_with_everything_flagged_leaves_no_tar(detector, tiny_detectors, tiny_model, tmp_path):
    stats, rows, images = generate_shard(
        tmp_path,
        tiny_model,
        {"detector": detector, "model": tiny_detectors[detector, "everything"], "action": "drop"},
        "drop",
    )
    assert images is None  # no tar: an empty one breaks readers that infer columns from it
    assert len(rows) == 6 and {r["status"] for r in rows} == {"filtered"}
    for r in rows:
        assert r["nsfw_score"] >= 0.5 and r["nsfw_scores"] and r["safety_flagged"] is True
        assert r["safety_detector"] == detector and r["safety_action"] == "drop"
        assert r["safety_threshold"] == 0.5 and len(r["safety_model_sha256"]) == 64
        assert r["image_sha256"] is None
    assert stats["filtered"] == 6 and stats["flagged"] == 6 and stats["images_in_tar"] == 0


@pytest.mark.parametrize("detector", DETECTORS)
def test_flagging_nothing_equals_a_none_run(detector, tiny_detectors, tiny_model, none_run):
    tmp, (_, none_rows, none_images) = none_run
    stats, rows, images = generate_shard(
        tmp,
        tiny_model,
        {"detector": detector, "model": tiny_detectors[detector, "nothing"]},
        f"safe-{detector}",
    )
    assert images == none_images and len(images) == 6
    assert [r["image_sha256"] for r in rows] == [r["image_sha256"] for r in none_rows]
    assert {r["status"] for r in rows} == {"ok"} and all(r["nsfw_score"] < 0.5 for r in rows)
    assert all(r["safety_flagged"] is False for r in rows) and stats["flagged"] == 0
    assert all(r["nsfw_score"] is None and r["safety_detector"] is None for r in none_rows)


def test_quarantine_moves_every_flagged_image_aside(tiny_detectors, tiny_model, none_run):
    tmp, (_, _, none_images) = none_run
    stats, rows, images = generate_shard(
        tmp,
        tiny_model,
        {
            "detector": "nsfw-detector",
            "model": tiny_detectors["nsfw-detector", "everything"],
            "action": "quarantine",
        },
        "quarantine",
    )
    assert images is None  # every image aside: the shard has no main tar
    held = tar_images(tmp / "quarantine" / "quarantine" / "00000.tar")
    assert held == none_images  # the very images, kept aside
    held_rows = pq.read_table(tmp / "quarantine" / "quarantine" / "00000.parquet").to_pylist()
    assert sorted(r["key"] for r in held_rows) == sorted(held)
    assert {r["status"] for r in rows} == {"filtered"} and stats["quarantined_images"] == 6
    assert stats["flagged_by_class"] == {"porn": 6}


def test_blackout_writes_black_images(tiny_detectors, tiny_model, tmp_path):
    _stats, rows, images = generate_shard(
        tmp_path,
        tiny_model,
        {
            "detector": "clip-checker",
            "model": tiny_detectors["clip-checker", "everything"],
            "action": "blackout",
        },
        "blackout",
    )
    assert len(images) == 6
    for data in images.values():
        assert not np.asarray(Image.open(io.BytesIO(data))).any()
    assert {r["status"] for r in rows} == {"ok"} and all(r["safety_flagged"] for r in rows)


def test_action_score_flags_but_keeps_every_image(tiny_detectors, tiny_model, none_run):
    tmp, (_, _, none_images) = none_run
    stats, rows, images = generate_shard(
        tmp,
        tiny_model,
        {
            "detector": "hf-classifier",
            "model": tiny_detectors["hf-classifier", "everything"],
            "action": "score",
        },
        "score",
    )
    assert images == none_images
    assert {r["status"] for r in rows} == {"ok"} and all(
        r["safety_flagged"] and r["nsfw_score"] > 0.99 for r in rows
    )
    assert stats["flagged_by_class"] == {"nsfw": 6}


@pytest.mark.slow
def test_cli_job_records_safety_provenance(tiny_detectors, tiny_model, tmp_path):
    """Through the CLI and Ray: _job.json, the dataset card and sizes.json carry the safety results."""
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        generation=TINY_GENERATION,
        sweep={"seeds": 2},
        output={"samples_per_shard": 4},
        safety={
            "detector": "nsfw-detector",
            "model": tiny_detectors["nsfw-detector", "everything"],
            "action": "quarantine",
            "threshold": 0.9,
        },
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("run", str(tmp_path / "job.yaml"), "--no-progress", env={"RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["results"]["filtered"] == 6
    assert job["results"]["safety"]["flagged_by_class"] == {"porn": 6}
    assert job["results"]["safety"]["model_sha256"] == [
        weights_sha256(tiny_detectors["nsfw-detector", "everything"])
    ]
    assert job["spec"]["safety"]["detector"] == "nsfw-detector"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "nsfw-detector" in card and "porn 6" in card and "threshold 0.9" in card
    # No tar at all: every image was quarantined, and no shard writes an empty tar.
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {}
    assert not list((tmp_path / "out").glob("*.tar"))
    assert "the dataset holds no image" in out.stdout and "no tar" in out.stdout
    assert len(list((tmp_path / "out" / "quarantine").glob("*.tar"))) == 2


def test_missing_detector_weights_refuse_the_job_before_any_gpu(tmp_path, tiny_model):
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS)
    spec = spec_dict(  # no safety section: the default detector, without its weights
        model={"source": str(tiny_model)},
        input={"uri": str(tmp_path / "in")},
        output={"uri": str(tmp_path / "out")},
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("run", str(tmp_path / "job.yaml"), env={"RAY_ADDRESS": ""})
    assert out.returncode == 1
    assert "safety.detector='nsfw-detector' needs safety.model" in out.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ a detector file that does not load


def broken_layer_config(good: str, path) -> str:
    """A copy of a valid tiny nsfw-detector .h5 (as `sdfleet tiny-models` writes it) whose head
    layer's config carries an argument Dense does not take: Keras' loader raises TypeError."""
    import shutil

    import h5py

    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        (head,) = [la for la in config["config"]["layers"] if la["class_name"] == "Dense"]
        head["config"]["not_a_dense_argument"] = 1
        f.attrs["model_config"] = json.dumps(config).encode()
    return str(path)


BROKEN_LINE = (
    "safety.model {}: layer 'predictions' (class 'Dense') does not deserialize under tf-keras "
    "(TypeError: ('Keyword argument not understood:', 'not_a_dense_argument'))"
)


def assert_one_line_refusal(out, path) -> None:
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1 and BROKEN_LINE.format(path) in errors[0], out.stderr[-3000:]
    for trace in ("Traceback", "Fatal Python error", "Aborted"):
        assert trace not in out.stderr, out.stderr[-3000:]


def test_a_detector_h5_whose_layers_do_not_deserialize_is_refused_before_any_worker(
    tiny_detectors, tiny_model, tmp_path
):
    path = broken_layer_config(tiny_detectors["nsfw-detector", "nothing"], tmp_path / "bad.h5")
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        safety={"detector": "nsfw-detector", "model": path},
    )
    write_spec(tmp_path, spec, "job.yaml")
    for command in ("plan", "run"):
        out = run_cli(command, str(tmp_path / "job.yaml"), env={"RAY_ADDRESS": ""})
        assert_one_line_refusal(out, path)
        assert "Ray" not in out.stderr  # no worker was started
    assert not (tmp_path / "out").exists()
    # The worker's own load says the same line (a copy the driver could not check first).
    with pytest.raises(Exception, match="does not deserialize under tf-keras") as raised:
        load_detector(SafetySpec(detector="nsfw-detector", model=path), "cpu")
    assert BROKEN_LINE.format(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_remote_detector_h5_that_does_not_load_stops_the_job_in_one_line(
    tiny_detectors, tiny_model, tmp_path, s3, ray_cluster
):
    """On s3 the driver cannot build it; the first worker refuses it and the job stops, exit 1."""
    local = broken_layer_config(tiny_detectors["nsfw-detector", "nothing"], tmp_path / "bad.h5")
    s3.put(local, f"{s3.bucket}/detector/bad.h5")
    write_prompts(tmp_path / "in" / "p.parquet", PROMPTS)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        f"s3://{s3.bucket}/out",
        generation=TINY_GENERATION,
        safety={"detector": "nsfw-detector", "model": f"s3://{s3.bucket}/detector/bad.h5"},
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli(
        "run", str(tmp_path / "job.yaml"), "--address", ray_cluster.address, "--no-progress"
    )
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert BROKEN_LINE.format(f"s3://{s3.bucket}/detector/bad.h5") in errors[0], errors[0]
    for trace in ("Traceback", "Fatal Python error"):
        assert trace not in out.stderr, out.stderr[-3000:]
