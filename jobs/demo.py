"""`sdfleet demo`: the whole path on one machine with tiny local models, in well under a minute."""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO_PROMPTS = [
    "a lighthouse on a cliff at dawn, oil painting",
    "a red fox in fresh snow, wildlife photograph",
    "an isometric city block at night, neon signs",
    "a bowl of ramen, studio lighting, 35mm",
    "a watercolor map of an imaginary island",
    "a vintage robot reading a newspaper",
    "macro photo of a dew drop on a leaf",
    "a cozy cabin interior with a fireplace",
    "a sailing ship in a storm, dramatic clouds",
    "a bonsai tree on a marble table, minimalist",
]


def write_demo_prompts(folder: Path) -> None:
    """Two files with several row groups each, like a real sharded prompt table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    half = len(DEMO_PROMPTS) // 2
    for i, chunk in enumerate((DEMO_PROMPTS[:half], DEMO_PROMPTS[half:])):
        ids = [f"demo-{i * half + j:03d}" for j in range(len(chunk))]
        table = pa.table(
            {"prompt_id": ids, "prompt": chunk, "source": ["sdfleet-demo"] * len(chunk)}
        )
        pq.write_table(table, folder / f"prompts-{i:03d}.parquet", row_group_size=2)


def demo_spec(root: Path) -> dict:
    return {
        "name": "sdfleet-demo",
        "model": {
            "source": str(root / "models" / "tiny-sd2"),
            "dtype": "float16",
            "scheduler": "EulerDiscreteScheduler",
        },
        "input": {"uri": str(root / "prompts"), "passthrough_columns": ["source"]},
        "generation": {"num_inference_steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64},
        "sweep": {"seeds": 2, "base_seed": 0, "axes": {"guidance_scale": [3.0, 7.5]}},
        "output": {"uri": str(root / "output"), "image_format": "png", "samples_per_shard": 10},
        # The customer's detector, with the tiny random Keras model in nsfw-detector's format.
        "safety": {
            "detector": "nsfw-detector",
            "model": str(root / "models" / "tiny-nsfw.h5"),
            "action": "drop",
        },
        "resources": {"batch_size": 4, "max_workers": 2},
    }


def run_demo(directory: str) -> int:
    from sdfleet.jobs.run import JobRunner
    from sdfleet.schemas.spec import load_spec

    root = Path(directory).absolute()
    # 1. The tiny model and the prompt table, made once.
    if not (root / "models" / "tiny-nsfw.h5").exists():
        from sdfleet.jobs.tiny import write_tiny_models

        write_tiny_models(root / "models")
    if not (root / "prompts").exists():
        write_demo_prompts(root / "prompts")
    # 2. The spec, written out so it can be read, edited and rerun with `sdfleet run`.
    spec_path = root / "demo.yaml"
    if not spec_path.exists():
        spec_path.write_text(yaml.safe_dump(demo_spec(root), sort_keys=False))
    # 3. A real job on a local Ray.
    code = JobRunner(load_spec(spec_path)).run()
    out = root / "output"
    # 4. A contact sheet to look at right away.
    from sdfleet.jobs.preview import run_preview

    sheet = run_preview(str(out)) if code == 0 else None
    print(
        f"\nDataset: {out}\n"
        f"  look:    {sheet}  (more: sdfleet preview {out} --html | --grid x=guidance_scale,y=seed)\n"
        f"  spec:    {spec_path} (rerun: sdfleet run {spec_path})\n"
        f"  status:  sdfleet status {out}\n"
        f'  rows:    python -c "import glob, pandas as pd; '
        f"print(pd.concat(map(pd.read_parquet, sorted(glob.glob('{out}/*.parquet')))))\"\n"
        f"  images:  tar tf {out}/00000.tar | head",
    )
    return code
