"""Pre-flight: everything `run` checks before any worker starts, writing nothing.

`sdfleet plan` runs it alone; `sdfleet run` runs it first and is handed its result: a finished,
immutable plan (the checkpoint's native size filled in) and the verdict on the output. Nothing after
it changes the plan.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from sdfleet.actors.keras_models import check_keras_builds, check_keras_model, import_tensorflow
from sdfleet.actors.lora import check_lora_file
from sdfleet.actors.model_files import (
    check_head_file,
    check_keras_file_format,
    check_transformers_config,
    clip_embedding_size,
)
from sdfleet.actors.storage import Storage
from sdfleet.actors.storage_errors import check_first_contact
from sdfleet.jobs.checkpoint import (
    check_model_source,
    check_refiner,
    check_scheduler_names,
    check_task,
    check_vae,
    read_checkpoint,
    read_config,
)
from sdfleet.jobs.content import resolve_content
from sdfleet.jobs.plan import Planner
from sdfleet.jobs.sink import OutputSink, Verdict
from sdfleet.schemas.detectors import DETECTORS
from sdfleet.schemas.errors import InputError, SpecError
from sdfleet.schemas.families import Family, Variant, family_of
from sdfleet.schemas.family_spec import check_family_spec, with_family_defaults
from sdfleet.schemas.locations import fixed_part, is_glob, kind_of
from sdfleet.schemas.lora import lora_key
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.schedulers import scheduler_names
from sdfleet.schemas.spec import JobSpec
from sdfleet.schemas.tasks import TASKS
from sdfleet.schemas.weights import is_safetensors

log = logging.getLogger("sdfleet")


@dataclass(frozen=True)
class CheckedPlan:
    """What pre-flight hands `run`: the plan to make, and what to do with the output."""

    plan: Plan
    verdict: Verdict
    # The pipeline class the checkpoint's model_index.json names, as read once here (None: none).
    pipeline_class: str | None = None
    # ... and model.refiner's checkpoint's (None: no refiner).
    refiner_class: str | None = None
    # The checkpoint's variant (SD3.5 Large, FLUX.1-schnell), told by the denoiser config read
    # here, which `plan` costs it as; None where its family has none or the config matches none.
    variant: Variant | None = None


class Preflight:
    def __init__(self, spec: JobSpec):
        self.spec = spec

    def check(self) -> CheckedPlan:
        """The input (by planning it), the model, the detector and curation's models, and the
        output; in that order, so the first problem a user meets is the first one a run meets."""
        # 1. Plan: lists the input and reads Parquet footers; bad input is refused here. First one
        #    bounded request to each S3 location, so a wrong endpoint is named in seconds.
        self._check_input_and_output_apart()
        for key, section in (("input.uri", self.spec.input), ("output.uri", self.spec.output)):
            uri = section.uri
            check_first_contact(
                fixed_part(uri) if is_glob(uri) else uri, key, section.storage_options
            )
        planned = Planner(self.spec).plan()
        log.info(
            "planned %d samples in %d shards from %d input file(s)",
            planned.num_samples,
            planned.num_shards,
            len(planned.files),
        )
        # 2. The model (does it fit the task?) and the detector, before any GPU is asked for.
        checkpoint, refiner = self._check_model()
        self._check_sizes(checkpoint.family)
        check_family_spec(
            self.spec, checkpoint.family, checkpoint.denoiser_config, checkpoint.source
        )
        self._check_loras(checkpoint.family)
        self._check_detector()
        self._check_curation_models()
        # 3. The checkpoint's own image size where the spec gives none, so that the fingerprint,
        #    the estimate and every row name the size that is made, and the family's own defaults
        #    (`with_family_defaults`: its dtype and scheduler, its checkpoint kind's steps,
        #    guidance and T5 tokens, skip-layer guidance's); and what the input, the files its rows
        #    point at and the checkpoint are by content, resolved once, here.
        family = family_of(checkpoint.class_name)
        spec = with_family_defaults(
            self._with_checkpoint_size(checkpoint),
            checkpoint.family,
            checkpoint.denoiser_config,
            checkpoint.scheduler_class,
        )
        plan = dataclasses.replace(planned, spec=spec, family=family.name if family else None)
        plan = dataclasses.replace(plan, content=resolve_content(plan))
        try:  # the family's own columns may clash with a passthrough column planning accepted
            plan.output_schema()
        except ValueError as e:
            raise InputError(str(e)) from None
        # 4. The output: empty, this job's, or a job that committed nothing.
        storage = Storage(self.spec.output.uri, self.spec.output.storage_options)
        verdict = OutputSink(storage).judge(plan)
        if verdict.without_content:
            log.warning(
                "%s was begun by an sdfleet that did not record content: resuming it as it was, "
                "without checking that its input and model are unchanged",
                verdict.url,
            )
            plan = dataclasses.replace(plan, content=None)
        return CheckedPlan(
            plan,
            verdict,
            checkpoint.class_name,
            refiner.class_name if refiner else None,
            checkpoint.variant,
        )

    def _check_input_and_output_apart(self) -> None:
        """An output inside the input folder would be read back as prompts (every *.parquet below
        it), and an input inside the output would be taken for stray files."""

        def folder(uri: str) -> str:
            # A glob stands for its fixed part's folder; a file or folder URI is kept whole.
            uri = uri.removeprefix("file://")
            return (fixed_part(uri).rsplit("/", 1)[0] if is_glob(uri) else uri).rstrip("/")

        inp, out = folder(self.spec.input.uri), folder(self.spec.output.uri)
        if inp == out or inp.startswith(out + "/") or out.startswith(inp + "/"):
            raise SpecError(
                f"input.uri {self.spec.input.uri} and output.uri {self.spec.output.uri} overlap: a "
                "run would read its own Parquet files as prompts. Give them separate folders"
            )

    def _check_model(self):
        """The checkpoint: where it is, what it is, whether it does the task and has the schedulers
        the spec names; and model.refiner's. Returns what was read of both (refiner: None
        without one)."""
        names = scheduler_names(
            self.spec.model.scheduler, self.spec.sweep.axes.get("scheduler", [])
        )
        check_model_source(self.spec.model)
        checkpoint = read_checkpoint(self.spec.model)
        family = family_of(checkpoint.class_name)
        if family is not None:  # an unknown class is left to check_task
            family.check_task(self.spec.model.task, checkpoint.source, checkpoint.variant)
        check_task(self.spec.model.task, checkpoint)
        refiner = check_refiner(self.spec.model, checkpoint)
        check_vae(self.spec.model, checkpoint)
        check_scheduler_names(names)
        return checkpoint, refiner

    def _check_loras(self, family: Family) -> None:
        """model.loras: each local file there, safetensors by its header, with LoRA weights for
        this family's denoiser (read from the header alone). A remote or hub file is checked the
        same way by the first worker that copies it (sdfleet.actors.lora)."""
        for i, lora in enumerate(self.spec.model.loras):
            key, path = lora_key(i), lora.location()
            kind = kind_of(lora.source)
            if kind == "missing" or (kind == "local" and not Path(path).expanduser().is_file()):
                raise SpecError(
                    f"{key} {path} does not exist: give the LoRA's .safetensors file (or its "
                    "folder with weight_name)"
                )
            if kind == "local":
                check_lora_file(Path(path).expanduser(), family.denoiser, key)

    def _check_sizes(self, family: Family) -> None:
        """generation.width and height, and their sweep values, on the latent grid of the
        checkpoint's family; else one line naming the family, the key and the nearest sizes."""
        gen, axes = self.spec.generation, self.spec.sweep.axes
        for key in ("width", "height"):
            given = [(f"generation.{key}", getattr(gen, key))]
            given += [(f"sweep.axes.{key}", value) for value in axes.get(key, [])]
            for name, value in given:
                if isinstance(value, int):
                    try:
                        family.check_size(name, value)
                    except ValueError as e:
                        raise SpecError(str(e)) from None

    def _check_detector(self) -> None:
        safety = self.spec.safety
        safety.check_runnable()
        if DETECTORS[safety.detector].safetensors_file and not is_safetensors(safety.model):
            raise SpecError(
                f"safety.model={safety.model} is not a .safetensors file; {safety.detector} loads "
                "its head from safetensors only: convert the original once (see the README's "
                "Curation section)"
            )
        if safety.model and kind_of(safety.model) == "missing":
            raise SpecError(
                f"safety.model {safety.model} does not exist; give the detector's weights"
            )
        if safety.model and kind_of(safety.model) in ("local", "remote"):
            self._check_detector_file(safety.detector, safety.model, kind_of(safety.model))

    def _check_detector_file(self, detector: str, path: str, kind: str) -> None:
        """A detector's weights, in the format its class loads (read from headers only; a remote
        folder's config.json, a remote file is left to the workers); laion-clip-nsfw's head as wide
        as curation.clip_model's embeddings."""
        folders = {
            "clip-checker": (
                ("StableDiffusionSafetyChecker",),
                "diffusers' StableDiffusionSafetyChecker (the SD 1.x safety_checker folder)",
            ),
            "hf-classifier": (
                ("ForImageClassification",),
                "a transformers image classifier (a *ForImageClassification folder)",
            ),
        }
        if detector in folders:
            options = self.spec.safety.storage_options
            config = read_config(path, "config.json", options, key="safety.model")
            check_transformers_config(config, path, "safety.model", *folders[detector])
        elif kind != "local":
            return
        elif detector == "nsfw-detector":
            check_keras_file_format(path)
            _check_keras_file(path)
        elif detector == "laion-clip-nsfw":
            check_head_file(path, "nsfw", "safety.model", self._clip_embedding_size())

    def _clip_embedding_size(self) -> int | None:
        """curation.clip_model's embedding width, read from its config.json where it is a local or
        s3:// folder (None: a hub id, left to the workers)."""
        cur = self.spec.curation
        if cur.clip_model is None or kind_of(cur.clip_model) not in ("local", "remote"):
            return None
        key = "curation.clip_model"
        config = read_config(cur.clip_model, "config.json", cur.storage_options, key=key)
        return clip_embedding_size(config, cur.clip_model, key)

    def _check_curation_models(self) -> None:
        """What the driver can see of curation.*'s models: heads are safetensors files, and local
        paths exist."""
        cur = self.spec.curation
        for key in ("clip_model", "aesthetic_model", "nsfw_model"):
            value = getattr(cur, key)
            if value is None:
                continue
            if key != "clip_model" and not is_safetensors(value):
                raise SpecError(
                    f"curation.{key}={value} is not a .safetensors file; sdfleet loads heads from "
                    "safetensors only: convert the original once (see the README's Curation "
                    "section)"
                )
            if kind_of(value) == "missing":
                raise SpecError(f"curation.{key} {value} does not exist")
        # What the local files are, from their headers: a CLIP folder, heads of their kind and
        # as wide as its embeddings.
        size = self._clip_embedding_size()
        for key, kind in (("aesthetic_model", "aesthetic"), ("nsfw_model", "nsfw")):
            value = getattr(cur, key)
            if value is not None and kind_of(value) == "local":
                check_head_file(value, kind, f"curation.{key}", size)

    def _with_checkpoint_size(self, checkpoint) -> JobSpec:
        """Text-to-image without a width or height makes the checkpoint's native size (512-base:
        512, 768-v: 768); the image tasks' sizes come from their inputs."""
        gen = self.spec.generation
        if TASKS[self.spec.model.task].image or (gen.width is not None and gen.height is not None):
            return self.spec
        size = checkpoint.default_size or checkpoint.family.fallback_size
        if not checkpoint.default_size:
            log.warning(
                "model.source %s names no native size; making %dx%d "
                "(set generation.width and height)",
                checkpoint.source,
                size,
                size,
            )
        resolved = gen.model_copy(update={"width": gen.width or size, "height": gen.height or size})
        return self.spec.model_copy(update={"generation": resolved})


def _check_keras_file(path: str) -> None:
    """A local Keras detector file, as its workers will check and build it: refused here if it would
    run code or its layer config does not deserialize, before any worker starts. A driver without
    tf-keras leaves both to the workers (each refuses such a file in one line)."""
    try:
        import_tensorflow()
    except ImportError as e:
        log.debug("safety.model %s is checked by the workers only: %s", path, e)
        return
    check_keras_model(path)
    check_keras_builds(path)
