import subprocess
import sys

import pytest

from helpers import job_dict, run_cli, spec_dict, write_prompts, write_spec
from sdfleet.actors.reader import read_shard_samples
from sdfleet.jobs.plan import Planner, estimate, list_parquet
from sdfleet.schemas.errors import InputError
from sdfleet.schemas.samples import derive_seed, key_width, sample_key, sweep_points
from sdfleet.schemas.spec import parse_spec


def make_input(tmp_path, sizes=(5, 4), row_group_size=2):
    n = 0
    for i, size in enumerate(sizes):
        prompts = [f"prompt number {n + j}" for j in range(size)]
        ids = [f"id-{n + j}" for j in range(size)]
        write_prompts(
            tmp_path / "in" / f"part-{i}.parquet",
            prompts,
            ids,
            row_group_size=row_group_size,
            lang=["en"] * size,
        )
        n += size
    return tmp_path / "in"


def spec_for(tmp_path, **over):
    data = {
        "input": {"uri": str(tmp_path / "in"), "passthrough_columns": ["lang"]},
        "output": {"uri": str(tmp_path / "out"), "samples_per_shard": 5},
        "sweep": {"seeds": 2, "axes": {"guidance_scale": [3.0, 7.5]}},
    }
    return parse_spec(spec_dict(data, **over))


def test_plan_counts_shards_and_boundaries(tmp_path):
    make_input(tmp_path, sizes=(5, 4))
    plan = Planner(spec_for(tmp_path)).plan()
    assert [f.rows for f in plan.files] == [5, 4]
    assert [f.row_groups for f in plan.files] == [[2, 2, 1], [2, 2]]
    assert len(plan.points) == 4
    assert plan.num_samples == 36
    assert plan.num_shards == 8  # ceil(36 / 5)
    assert plan.shard_range(0) == (0, 5)
    assert plan.shard_range(7) == (35, 36)


def test_shard_samples_follow_file_row_point_order(tmp_path):
    make_input(tmp_path, sizes=(5, 4))
    plan = Planner(spec_for(tmp_path)).plan()
    samples = [s for shard in range(plan.num_shards) for s in read_shard_samples(plan, shard)]
    assert len(samples) == plan.num_samples
    # Keys: shard then offset, unique and fixed-width.
    assert (
        samples[0].key == "000000000"
        and samples[5].key == "000010000"
        and samples[-1].key == "000070000"
    )
    assert len({s.key for s in samples}) == len(samples)
    # Row order across the file boundary (row 5 is the first row of the second file), sweep innermost.
    assert [s.prompt_id for s in samples[:8]] == ["id-0"] * 4 + ["id-1"] * 4
    assert samples[20].prompt_id == "id-5" and samples[20].params.prompt == "prompt number 5"
    assert [s.params.guidance_scale for s in samples[:4]] == [3.0, 3.0, 7.5, 7.5]
    # The same seed index gives the same seed at every guidance value, and seeds match the derivation.
    s = samples[:4]
    assert s[0].params.seed == s[2].params.seed == derive_seed(0, "id-0", 0)
    assert s[1].params.seed == s[3].params.seed == derive_seed(0, "id-0", 1)
    assert s[0].params.seed != s[1].params.seed
    assert samples[0].passthrough == {"lang": "en"}


def test_plan_is_deterministic(tmp_path):
    make_input(tmp_path)
    a, b = Planner(spec_for(tmp_path)).plan(), Planner(spec_for(tmp_path)).plan()
    assert a.fingerprint == b.fingerprint
    sa = [(s.key, s.params.seed) for s in read_shard_samples(a, 3)]
    sb = [(s.key, s.params.seed) for s in read_shard_samples(b, 3)]
    assert sa == sb


def test_a_seed_list_is_used_as_given_and_missing_ids_default_to_file_and_row(tmp_path):
    make_input(tmp_path, sizes=(3,))
    spec = spec_for(tmp_path, sweep={"seeds": [11, 22], "axes": {}}, input={"id_column": None})
    plan = Planner(spec).plan()
    samples = read_shard_samples(plan, 0)
    assert [s.params.seed for s in samples] == [11, 22, 11, 22, 11]
    assert samples[0].prompt_id == "part-0:0" and samples[2].prompt_id == "part-0:1"


def test_seed_derivation_is_stable_across_processes():
    code = "from sdfleet.schemas.samples import derive_seed; print(derive_seed(7, 'prompt-42', 3))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": str(i)},
            cwd=".",
        ).stdout.strip()
        for i in range(3)
    }
    assert len(outs) == 1
    seed = int(outs.pop())
    assert seed == derive_seed(7, "prompt-42", 3)
    assert 0 <= seed < 2**63
    # A pinned value: changing the derivation would silently change every dataset's images.
    assert derive_seed(0, "a", 0) == 5702018327209904986


def test_key_width_widens_past_99999_shards():
    assert key_width(1) == 5 and key_width(100_000) == 5 and key_width(100_001) == 6
    assert sample_key(3, 7) == "000030007"
    assert sample_key(123456, 7, key_width(200_000)) == "1234560007"


def test_sweep_points_are_a_cartesian_product():
    spec = parse_spec(
        {
            "input": {"uri": "x"},
            "output": {"uri": "y"},
            "sweep": {
                "seeds": 2,
                "axes": {"guidance_scale": [1, 2, 3], "num_inference_steps": [4, 8]},
            },
        }
    )
    points = sweep_points(spec)
    assert len(points) == 12
    assert points[0] == {"guidance_scale": 1.0, "num_inference_steps": 4, "seed_index": 0}
    assert points[-1] == {"guidance_scale": 3.0, "num_inference_steps": 8, "seed_index": 1}


def test_input_may_be_a_file_a_folder_or_a_glob(tmp_path):
    make_input(tmp_path, sizes=(2, 2, 2))
    folder = tmp_path / "in"
    assert [p.rsplit("/", 1)[-1] for p in list_parquet(str(folder))] == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
    ]
    assert len(list_parquet(str(folder / "part-1.parquet"))) == 1
    assert len(list_parquet(str(folder / "part-[01].parquet"))) == 2
    with pytest.raises(InputError, match="does not exist"):
        list_parquet(str(tmp_path / "nope"))


def test_missing_or_mistyped_prompt_column_is_refused(tmp_path):
    make_input(tmp_path)
    with pytest.raises(InputError, match=r"part-0.parquet has no prompt column 'text'"):
        Planner(spec_for(tmp_path, input={"prompt_column": "text"})).plan()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"prompt_id": ["a"], "prompt": [1], "lang": ["en"]}),
        tmp_path / "in" / "part-9.parquet",
    )
    with pytest.raises(
        InputError, match=r"part-9.parquet: prompt column 'prompt' has type int64, expected string"
    ):
        Planner(spec_for(tmp_path)).plan()


def test_empty_and_unreadable_files_are_refused(tmp_path):
    make_input(tmp_path)
    write_prompts(tmp_path / "in" / "part-5.parquet", [], [], lang=[])
    with pytest.raises(InputError, match=r"part-5.parquet has no rows"):
        Planner(spec_for(tmp_path)).plan()
    (tmp_path / "in" / "part-5.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"part-5.parquet is not a readable Parquet file"):
        Planner(spec_for(tmp_path)).plan()


def test_null_and_blank_prompts_become_failed_samples(tmp_path):
    write_prompts(
        tmp_path / "in" / "p.parquet", ["ok prompt", None, "   "], ["a", "b", "c"], lang=["x"] * 3
    )
    plan = Planner(spec_for(tmp_path, sweep={"seeds": 1, "axes": {}})).plan()
    samples = read_shard_samples(plan, 0)
    assert [s.error for s in samples] == [
        None,
        "prompt is null",
        "prompt is empty or whitespace-only",
    ]
    assert samples[1].params is None
    assert samples[1].planned.seed == derive_seed(0, "b", 0)  # recorded, though never generated


def test_cli_plan_prints_without_starting_anything(tmp_path, tiny_model):
    make_input(tmp_path)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        output={"samples_per_shard": 5},
        sweep={"seeds": 2, "axes": {"guidance_scale": [3.0, 7.5]}},
    )
    write_spec(tmp_path, spec, "job.yaml")
    code = (
        "import sys; from sdfleet.jobs.cli import main; rc = main(['plan', sys.argv[1]]); "
        "heavy = [m for m in ('ray', 'torch', 'diffusers') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "job.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "samples       36" in out.stdout and "shards        8" in out.stdout
    assert "GPU-hours" in out.stdout
    assert "HEAVY []" in out.stdout
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_spec_with_exit_1(tmp_path):
    """(A size off the latent grid is refused by pre-flight, which knows the checkpoint's family:
    tests/test_sdxl_tasks.py.)"""
    spec = spec_dict(input={"uri": "x"}, output={"uri": "y"}, generation={"guidance_scale": -1})
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 1
    assert "generation.guidance_scale=-1" in out.stderr


def test_plan_estimates_gpu_hours_and_cost(tmp_path):
    make_input(tmp_path)
    spec = spec_for(
        tmp_path,
        generation={"num_inference_steps": 50, "width": 512, "height": 512},
        sweep={"seeds": 1, "axes": {}},
        resources={"gpu_hour_usd": 2.0, "gpu_type": "a100"},
    )
    est = estimate(Planner(spec).plan())
    # 9 prompts x (50 CFG UNet steps + VAE decode + text) at SD2-base's FLOPs, 80 TFLOP/s on an A100.
    assert est["tflop"] == pytest.approx(9 * (1.609 * 50 + 2.51 + 0.09))
    assert est["gpu_hours"] == pytest.approx(est["tflop"] / 80 / 3600)
    assert est["cost_usd"] == pytest.approx(est["gpu_hours"] * 2.0)
    over = estimate(Planner(spec_for(tmp_path, resources={"throughput_tflops": 160.0})).plan())
    assert over["sustained_tflops"] == 160.0 and over["cost_usd"] is None
    from sdfleet.schemas.spec import SpecError

    with pytest.raises(SpecError, match=r"resources.gpu_type='b200' is not in gpu_throughput.yaml"):
        estimate(Planner(spec_for(tmp_path, resources={"gpu_type": "b200"})).plan())
    with pytest.raises(SpecError, match=r"budget_usd=5.0 needs resources.gpu_hour_usd"):
        spec_for(tmp_path, resources={"budget_usd": 5})


def test_cli_plan_prints_cost(tmp_path, tiny_model):
    make_input(tmp_path)
    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        resources={"gpu_hour_usd": 4.0, "budget_usd": 100},
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    assert "at $4.0/GPU-hour (budget $100.00)" in out.stdout and "TFLOP/s sustained" in out.stdout


def test_best_of_n_plans_every_candidate_slot_and_prices_a_range(tmp_path, tiny_model):
    """k of m candidates per prompt: the plan has m slots per prompt, and its compute, GPU-hours and
    cost run from every prompt's first k passing to all m tried."""
    from sdfleet.jobs.tiny import write_tiny_clip

    make_input(tmp_path)
    # A real (tiny) CLIP folder: plan checks that curation.clip_model is one.
    clip = write_tiny_clip(tmp_path / "clip")
    curation = {"clip_model": str(clip), "images_per_prompt": 2, "max_candidates": 8}
    spec = spec_for(
        tmp_path,
        generation={"num_inference_steps": 50, "width": 512, "height": 512},
        sweep={"seeds": 1, "axes": {"guidance_scale": [3.0, 7.5]}},
        output={"samples_per_shard": 16},
        resources={"gpu_hour_usd": 2.0},
        curation=curation,
    )
    plan = Planner(spec).plan()
    assert plan.num_samples == 9 * 2 * 8
    est = estimate(plan)
    assert est["tflop"] == pytest.approx(9 * 2 * 8 * (1.609 * 50 + 2.51 + 0.09))
    assert est["tflop_min"] == pytest.approx(est["tflop"] / 4) and est[
        "cost_usd_min"
    ] == pytest.approx(est["cost_usd"] / 4)

    spec = job_dict(
        tiny_model,
        tmp_path / "in",
        tmp_path / "out",
        output={"samples_per_shard": 16},
        generation={"num_inference_steps": 50, "width": 512, "height": 512},
        sweep={"axes": {"guidance_scale": [3.0, 7.5]}},
        curation=curation,
        resources={"gpu_hour_usd": 2.0, "budget_usd": round(est["cost_usd"] / 2, 4)},
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    assert "16 points per prompt (8 candidate seed(s) x guidance_scale[2])" in out.stdout
    assert (
        "candidates    8 slots per prompt and sweep point (curation.max_candidates), 36 images kept at most"
        in out.stdout
    ), out.stdout
    assert (
        f"compute       {est['tflop_min']:,.0f} … {est['tflop']:,.0f} TFLOP (2 … 8 candidates per prompt)"
        in out.stdout
    )
    assert (
        f"cost          ${est['cost_usd_min']:,.2f} … ${est['cost_usd']:,.2f} at $2.0/GPU-hour"
        in out.stdout
    )
    assert "warning       the budget is under the most cost" in out.stdout


def test_duplicate_ids_across_files_point_at_the_first(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", ["p"] * 4, ["x", "y", "x", None], lang=["en"] * 4)
    write_prompts(tmp_path / "in" / "b.parquet", ["p"] * 3, ["y", None, "z"], lang=["en"] * 3)
    plan = Planner(spec_for(tmp_path)).plan()
    # Later rows of a repeated id map to its first row; null ids are not ids (they get "<file>:<row>").
    assert plan.duplicate_rows == {2: 0, 4: 1}
    assert plan.locate(4) == "b.parquet:0"


def test_ids_whose_hashes_collide_are_told_apart_by_their_text(tmp_path, monkeypatch):
    """Pass 1 only finds hashes that repeat; pass 2 compares the ids, so a collision is no repeat."""
    import numpy as np

    import sdfleet.jobs.plan as planning

    write_prompts(
        tmp_path / "in" / "a.parquet",
        ["p"] * 5,
        ["x", "y", "x", None, None],
        row_group_size=2,
        lang=["en"] * 5,
    )
    write_prompts(
        tmp_path / "in" / "b.parquet", ["p"] * 3, ["7", "8", "7"], row_group_size=2, lang=["en"] * 3
    )
    monkeypatch.setattr(planning, "id_hashes", lambda ids, row: np.zeros(len(ids), dtype=np.uint64))
    monkeypatch.setattr(planning, "ID_BATCH_ROWS", 2)  # batches that split files
    plan = Planner(spec_for(tmp_path)).plan()
    assert plan.duplicate_rows == {2: 0, 7: 5}


def test_id_hashes_are_equal_for_equal_ids_only_and_do_not_depend_on_the_batch():
    import pyarrow as pa

    from sdfleet.jobs.plan import id_hashes

    ids = pa.array(["coco-1", "coco-2", "coco-1", None, None, "", "", "ab", "ba", "a" * 300])
    h = id_hashes(ids, 0).tolist()
    assert h[0] == h[2] and h[5] == h[6]
    assert (
        len({h[0], h[1], h[3], h[4], h[5], h[7], h[8], h[9]}) == 8
    )  # nulls never repeat each other
    assert id_hashes(ids.slice(7, 3), 7).tolist() == h[7:]
