"""The one-rule modules of sdfleet.schemas: locations, schedulers, weights, resources, and a sweep
point's coordinates (which the spec's sweepable keys and the preview grid's axes derive from)."""

from __future__ import annotations

import pytest

from sdfleet.schemas.families import FAMILIES
from sdfleet.schemas.locations import fixed_part, input_folder, is_glob, is_remote, kind_of
from sdfleet.schemas.resources import cpu_threads_per_worker, gpu_workers_per_node
from sdfleet.schemas.rows import OUTPUT_COLUMNS, family_fields, output_schema
from sdfleet.schemas.samples import SWEEP_COORDINATES, GenerationParams
from sdfleet.schemas.schedulers import (
    check_scheduler_name,
    defined_schedulers,
    scheduler_names,
    unknown_scheduler,
)
from sdfleet.schemas.spec import SWEEPABLE
from sdfleet.schemas.weights import is_safetensors, pickles_only


def test_locations(tmp_path):
    assert is_remote("s3://b/k") and not is_remote("file:///x") and not is_remote("/x")
    assert kind_of("s3://b/model") == "remote"
    assert kind_of(str(tmp_path)) == "local"
    assert kind_of("./nowhere") == "missing" and kind_of("~/nowhere-sdfleet") == "missing"
    assert kind_of("stabilityai/stable-diffusion-2-base") == "hub"


def test_input_folder_and_globs():
    assert is_glob("s3://b/p/*.parquet") and not is_glob("s3://b/p/")
    assert fixed_part("s3://b/p/x*/y?.parquet") == "s3://b/p/x" and fixed_part("/a/b") == "/a/b"
    assert input_folder("s3://b/p/") == "s3://b/p"
    assert input_folder("/data/in/part-0.parquet") == "/data/in"
    assert input_folder("/data/in/*/part-[0-9].parquet") == "/data/in"


def test_scheduler_rule():
    assert check_scheduler_name("EulerDiscreteScheduler") == "EulerDiscreteScheduler"
    assert check_scheduler_name(None) is None
    with pytest.raises(ValueError, match="is not a diffusers scheduler class name"):
        check_scheduler_name("euler")
    assert scheduler_names("B", ["A", None, "B"]) == ["A", "B"]
    assert scheduler_names(None) == []
    source = "class DDIMScheduler(SchedulerMixin):\n    pass\nclass Helper:\n    pass\n"
    assert defined_schedulers([source]) == {"DDIMScheduler"}
    assert "'X'" in unknown_scheduler("X")


def test_safetensors_only():
    assert is_safetensors("unet/diffusion_pytorch_model.safetensors")
    assert pickles_only(["a.bin", "config.json"]) == ["a.bin"]
    assert pickles_only(["a.bin", "a.safetensors"]) == []
    assert pickles_only(["config.json"]) == []


def test_cpu_threads_per_worker():
    assert cpu_threads_per_worker(16, gpu_workers_per_node(8, 1)) == 2
    assert cpu_threads_per_worker(16, gpu_workers_per_node(1, 0.5)) == 8
    assert cpu_threads_per_worker(2, gpu_workers_per_node(0, 1)) == 2
    assert cpu_threads_per_worker(1, 4) == 1


def test_sweepable_keys_and_grid_axes_derive_from_the_coordinates():
    from sdfleet.jobs.preview.grid import AXIS_COLUMNS, NOT_AXES

    assert set(SWEEPABLE) == set(SWEEP_COORDINATES) - {"seed"}
    # Each is a column of every row, or of the rows of the families that have it (T5's length),
    # or of jobs with model.loras (lora_scale).
    family_columns = {f.name for family in FAMILIES.values() for f in family_fields(family)}
    lora_columns = set(output_schema(loras=True).names) - set(OUTPUT_COLUMNS)
    assert set(SWEEP_COORDINATES) <= set(OUTPUT_COLUMNS) | family_columns | lora_columns
    assert AXIS_COLUMNS == SWEEP_COORDINATES
    # Results are never axes (the hand-kept list had drifted to offer these).
    assert {"clip_score", "candidate", "duplicate_of", "punsafe", "key"} <= NOT_AXES
    assert not NOT_AXES & set(AXIS_COLUMNS)


def test_batch_key_groups_by_every_coordinate_but_seed_and_negative_prompt():
    a = GenerationParams("p", "n", 1, 50, 7.5, 512, 512, "S")
    b = GenerationParams("q", "m", 2, 50, 7.5, 512, 512, "S")
    assert a.batch_key() == b.batch_key()
    changes = (
        {"num_inference_steps": 25},
        {"width": 64},
        {"scheduler": "T"},
        {"strength": 1},
        {"max_sequence_length": 77},
        {"true_cfg_scale": 4.0},
    )
    for change in changes:
        c = GenerationParams(**{**a.__dict__, **change})
        assert c.batch_key() != a.batch_key()
