"""`sdfleet score`: CLIP score per image and FID per sweep point of a finished (or partial) output.

    sdfleet score OUTPUT --clip-model SRC --reference DIR --fid-weights FILE [--out NAME]
                         [--batch-size N] [--device cpu|cuda] [--fid-size 299] [--note TEXT]

What it computes, the way the Stable Diffusion model cards plot it (FID against CLIP score, one
point per classifier-free guidance scale):

- **CLIP score** of every `ok` image against its own prompt: ``max(100 * cos(E_img, E_txt), 0)``,
  exactly as torchmetrics' ``CLIPScore`` defines it, computed with a transformers ``CLIPModel`` and
  ``CLIPProcessor`` (prompts longer than the text encoder's context are truncated, as there).
- **FID** of each sweep point's images against a folder of reference images (e.g. the COCO-2017
  validation images), with torchmetrics' ``FrechetInceptionDistance`` (float64 statistics,
  ``Tr(sqrt(S1 S2))`` from eigenvalues) and the 2048-d pool features of the FID InceptionV3 (the
  TensorFlow ``2015-12-05`` graph as ported by pytorch-fid / torch-fidelity). torchmetrics' own
  extractor would download its weights, so ``inception.InceptionV3FID`` is a torchvision-free rebuild of
  that network whose parameter names match the published ``pt_inception-2015-12-05-6726825d.pth``;
  its weights are read from a local or ``s3://`` **safetensors** file (``--fid-weights``).

  One-off conversion of the official weights, in a trusted environment (the ``.pth`` is a pickle;
  ``weights_only=True`` refuses anything but tensors)::

      python - <<'EOF'
      import torch, safetensors.torch
      sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
      safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "pt_inception-2015-12-05.safetensors")
      EOF

  (The file is pytorch-fid's release asset; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
  holds the same tensors.) Loading checks that every parameter of the network is present.

Images are grouped into sweep points by ``guidance_scale`` and every other axis in the job's
``spec.sweep.axes`` (seeds are not an axis: all seeds of a point count together). Every image, the
generated ones and the reference ones alike, is converted to RGB, centre-cropped to a square and
resized with PIL bicubic to ``--fid-size`` (default 299, Inception's input, so the network itself
resizes nothing). FID depends on such choices and on the number of images; compare figures made
with the same settings only.

Written into OUTPUT/_scores/ (through Storage, so ``s3://`` works; its own folder, so that the
output's top level holds only the dataset's files), with NAME = ``--out`` (default ``scores``):

- ``NAME.parquet``: one row per scored image: key, shard_id, sample_id, prompt_id, seed, guidance_scale,
  the other sweep columns, clip_score, safety_flagged.
- ``NAME_summary.json``: per sweep point n, mean/std CLIP score and FID, plus provenance (models and
  their hashes, reference count, settings) and ``notes``.
- ``NAME_fid_vs_clip.png``: FID against mean CLIP score, each point labelled with its guidance scale.

None of them is ever replaced: a NAME whose files exist is refused before any model loads
(``jobs.output.check_names_free``), and each file is created exclusively.

Figures from tiny or untrained models mean nothing, so a loud note goes into the summary and onto the
plot when the CLIP model or the feature extractor is tiny (by parameter count or architecture) or
untrained (normalisation layers still at their initial values), and ``--note`` adds any text of yours.

An output scored by an sdfleet that wrote these files at its top level has them moved: once the new
ones are written, the top-level NAME.parquet (a scores file, never a shard's) and its companions are
removed.

Only shards committed under the job's fingerprint are scored; an incomplete dataset is scored as far
as it goes and says so (``dataset_complete: false``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_OK, SpecError
from sdfleet.schemas.loading import absolute_local_path


class ScoreError(SpecError):
    """Arguments or inputs that cannot be scored; the CLI prints the message and exits 1."""


DEFAULT_OUT = "scores"
DEFAULT_FID_SIZE = 299
LOUD_NOTE = "TINY/RANDOM MODELS - FIGURES MEAN NOTHING"


def format_value(v: Any) -> str:
    """A sweep value as a label: 7.5, not 7.500000."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def __getattr__(name: str):
    # `run_score` is the public entry, but its module imports torch; the CLI imports this package
    # only to build its parser, so the scoring modules load on first use.
    if name == "run_score":
        from sdfleet.jobs.score.run import run_score

        return run_score
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sdfleet score` arguments (wire with `add_arguments(sub.add_parser("score", ...))`)."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "output",
        help="sdfleet output folder or s3:// prefix to score (scores are written into it), "
        "or the job's spec file (then its output.uri and storage_options)",
    )
    p.add_argument(
        "--clip-model",
        required=True,
        metavar="SRC",
        help="CLIP checkpoint (transformers CLIPModel + CLIPProcessor, safetensors): local folder, "
        "s3:// folder or hub id, e.g. a mirror of openai/clip-vit-large-patch14",
    )
    p.add_argument(
        "--reference",
        metavar="DIR",
        help="folder (local or s3://) of reference images for FID, e.g. COCO val2017",
    )
    p.add_argument(
        "--fid-weights",
        metavar="FILE",
        help="FID InceptionV3 weights as .safetensors (local or s3://), converted once from "
        "pt_inception-2015-12-05-6726825d.pth (see above)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="NAME",
        help=f"base name of the files written: {', '.join(layout.score_files('NAME').values())} "
        f"(default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per forward (default 32)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--fid-size",
        type=int,
        default=DEFAULT_FID_SIZE,
        metavar="PX",
        help=f"images are centre-cropped and resized to PX before the feature extractor "
        f"(default {DEFAULT_FID_SIZE})",
    )
    p.add_argument("--note", help="text added to the summary and the plot")


def command(args: argparse.Namespace) -> int:
    """`sdfleet score`: score, then print a line per sweep point and the files written."""
    from sdfleet.jobs.score.run import run_score

    # The one path rule: what is typed on the command line is the working directory's, and
    # recorded absolute (the summary names the CLIP model it scored with).
    here = Path.cwd()
    summary = run_score(
        args.output,
        absolute_local_path(args.clip_model, here, maybe_hub_id=True),
        absolute_local_path(args.reference, here),
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        fid_weights=absolute_local_path(args.fid_weights, here),
        fid_size=args.fid_size,
        note=args.note,
        storage_options=args.storage_options,
    )
    print(
        f"scored        {summary['images_scored']} images in {summary['shards_scored']} shards"
        f"{'' if summary['dataset_complete'] else ' (dataset incomplete)'}"
    )
    for p in summary["points"]:
        where = ", ".join(f"{c}={format_value(p[c])}" for c in summary["group_by"])
        fid = "n/a" if p["fid"] is None else f"{p['fid']:.4g}"
        print(f"  {where}: n={p['n']} clip={p['clip_score_mean']:.2f} fid={fid}")
    for n in summary["notes"]:
        print(f"note          {n}")
    print(f"written       {', '.join(f for f in summary['files'].values() if f)}")
    return EXIT_OK
