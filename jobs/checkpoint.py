"""What the driver checks of a checkpoint before any worker starts: its weight formats, that it
fits the task, its native size and the scheduler names. Read from JSON configs and diffusers'
source, never by loading a weight, so `sdfleet plan` and `sdfleet run`'s driver stay free of torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdfleet.actors.model_content import HUB_TIMEOUT_S
from sdfleet.actors.storage import Storage
from sdfleet.schemas.errors import ModelLoadError, SpecError, first_line
from sdfleet.schemas.families import DEFAULT_FAMILY, Family, Variant, family_of, vae_scale_factor
from sdfleet.schemas.locations import kind_of
from sdfleet.schemas.schedulers import defined_schedulers, unknown_scheduler
from sdfleet.schemas.spec import ModelSpec
from sdfleet.schemas.tasks import TASKS, TEXT_TO_IMAGE
from sdfleet.schemas.weights import is_safetensors, pickles_only


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint the spec names: the key naming it (for messages), where it is, its revision,
    and the options to read it with."""

    key: str
    source: str
    revision: str | None
    storage_options: dict

    @classmethod
    def of(cls, model: ModelSpec | CheckpointRef) -> CheckpointRef:
        """model.source's checkpoint (a ref is itself)."""
        if isinstance(model, CheckpointRef):
            return model
        return cls("model.source", model.source, model.revision, model.storage_options)

    @classmethod
    def refiner_of(cls, model: ModelSpec) -> CheckpointRef:
        """model.refiner's checkpoint, read with model.storage_options as the base is."""
        refiner = model.refiner
        return cls("model.refiner.source", refiner.source, refiner.revision, model.storage_options)


def check_model_source(model: ModelSpec | CheckpointRef) -> None:
    """What the driver can check of the model before any worker starts: the folder and its weight
    formats (safetensors only, per component), or that a hub id can be had at all."""
    ref = CheckpointRef.of(model)
    source, key = ref.source, ref.key
    kind = kind_of(source)
    if kind == "remote":
        if not Storage(source, ref.storage_options).exists("model_index.json"):
            raise ModelLoadError(
                f"{key} {source} has no model_index.json; point it at a diffusers folder"
            )
    elif kind == "local":
        _check_local_pipeline(Path(source).expanduser(), key)
    elif kind == "missing":
        raise ModelLoadError(f"{key} {source} does not exist")
    else:
        _check_hub_pipeline(source, ref.revision, key)


def _check_local_pipeline(folder: Path, key: str) -> None:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{key} {folder} is a local path without model_index.json; point it at a "
            "diffusers pipeline folder (save_pretrained output)"
        )
    # Every component with weights must have them as safetensors: one pickle-only component would
    # fail only inside the workers.
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = pickles_only(p.name for p in component.rglob("*"))
        if pickles:
            raise ModelLoadError(
                f"{key} {folder} holds only pickle weights for {component.name} "
                f"({pickles[0]}); sdfleet loads safetensors only. Convert it with "
                "`pipe.save_pretrained(dir, safe_serialization=True)` in a trusted environment"
            )


def _check_hub_pipeline(repo: str, revision: str | None, key: str) -> None:
    """A hub id: in the local cache when offline, else on a hub that answers, with safetensors."""
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    advice = f"point {key} at a local folder or an s3:// mirror"
    if hub_constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if not isinstance(cached, str):
            raise ModelLoadError(
                f"{key} {repo} is a hub id, HF_HUB_OFFLINE is set and the local Hugging "
                f"Face cache does not hold it: {advice}"
            )
        return
    try:
        info = huggingface_hub.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 -- network, not found, gated: each is said in one line
        kind = type(e).__name__
        if "NotFound" in kind or "Gated" in kind:
            raise ModelLoadError(
                f"{key} {repo}: the hub has no such model you may read ({kind}); {advice}, "
                "or log in with a token that may read it"
            ) from None
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub for {repo} ({kind}: {first_line(e)[:120]}): "
            f"{advice}, or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None
    names = [s.rfilename for s in info.siblings or []]
    if names and not any(is_safetensors(n) for n in names):
        raise ModelLoadError(
            f"{key} {repo} has no safetensors weights on the hub; sdfleet loads "
            f"safetensors only: {advice} holding a converted copy"
        )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's JSON configs say about it: enough to check it fits the task and to know
    its native image size, before any worker (or torch) loads it."""

    source: str
    class_name: str | None  # model_index.json's _class_name
    components: frozenset[str]
    unet_in_channels: int | None  # None: no UNet (a transformer-based family)
    sample_size: int | None  # the denoiser's latent size (the UNet's, SD3's transformer's)
    vae_scale_factor: int
    prediction_type: str | None
    vae_latent_channels: int | None = None  # None: no VAE config read
    # The denoiser's config.json (the UNet's; a transformer family's transformer's): what tells
    # the family's checkpoint kinds apart (`Family.variant`), and its depth; {} where none was read.
    denoiser_config: Mapping = dataclasses.field(default_factory=dict)
    scheduler_class: str | None = None  # scheduler_config.json's _class_name

    @property
    def family(self) -> Family:
        """Its family by model_index.json's class; SD2 where unknown."""
        return family_of(self.class_name) or DEFAULT_FAMILY

    @property
    def variant(self) -> Variant | None:
        return self.family.variant(self.denoiser_config)

    @property
    def default_size(self) -> int | None:
        """The size it was trained at (512-base: 64 * 8, 768-v: 96 * 8, FLUX.1: 128 * 8), or None
        where unknown."""
        return self.family.native_size(self.sample_size, self.vae_scale_factor)

    def describe(self) -> str:
        unet = (
            f" with a {self.unet_in_channels}-channel UNet"
            if self.unet_in_channels is not None
            else ""
        )
        return f"a {self.class_name or 'diffusers pipeline'}{unet}"


def read_config(
    source: str,
    name: str,
    storage_options: dict,
    revision: str | None = None,
    key: str = "model.source",
) -> dict:
    """One JSON config of a local folder, an s3:// mirror or a hub repo (its cache when
    offline), without loading a weight; {} where there is no such file. key: the spec key that
    named the source, for the error."""
    kind = kind_of(source)
    try:
        if kind == "remote":
            storage = Storage(source, storage_options)
            return storage.read_json(name) if storage.exists(name) else {}
        if kind in ("local", "missing"):
            local = Path(source).expanduser()
            return json.loads((local / name).read_text()) if (local / name).is_file() else {}
        import huggingface_hub

        try:
            return json.loads(
                Path(huggingface_hub.hf_hub_download(source, name, revision=revision)).read_text()
            )
        except huggingface_hub.errors.EntryNotFoundError:
            return {}
        except Exception as e:
            raise OSError(f"the hub did not give it: {type(e).__name__}: {first_line(e)}") from e
    except (OSError, ValueError) as e:  # ValueError: not JSON
        raise ModelLoadError(
            f"cannot read {name} of {key} {source}: {type(e).__name__}: {first_line(e)}"
        ) from None


def read_checkpoint(model: ModelSpec | CheckpointRef) -> Checkpoint:
    """Read model_index.json and the UNet's and VAE's configs from a local folder, an s3:// mirror
    or the hub (its cache when offline), without loading a weight."""
    ref = CheckpointRef.of(model)
    source = ref.source

    def config(name: str) -> dict:
        return read_config(source, name, ref.storage_options, ref.revision, key=ref.key)

    index = config("model_index.json")
    denoiser_name = (family_of(index.get("_class_name")) or DEFAULT_FAMILY).denoiser
    denoiser = config(f"{denoiser_name}/config.json") if denoiser_name in index else {}
    unet = denoiser if denoiser_name == "unet" else {}
    vae = config("vae/config.json") if "vae" in index else {}
    scheduler = config("scheduler/scheduler_config.json") if "scheduler" in index else {}
    return Checkpoint(
        source=source,
        class_name=index.get("_class_name"),
        components=frozenset(k for k in index if not k.startswith("_")),
        unet_in_channels=unet.get("in_channels"),
        sample_size=denoiser.get("sample_size"),
        vae_scale_factor=vae_scale_factor(vae),
        prediction_type=scheduler.get("prediction_type"),
        vae_latent_channels=vae.get("latent_channels") if vae else None,
        denoiser_config=denoiser,
        scheduler_class=scheduler.get("_class_name"),
    )


def check_task(task_name: str, checkpoint: Checkpoint) -> None:
    """The checkpoint is one the task can run: its UNet takes the task's conditioning channels and
    it has the task's extra component. Else the error names both, before any GPU starts."""
    task = TASKS[task_name]
    if checkpoint.unet_in_channels is not None:
        fits = checkpoint.unet_in_channels == task.unet_in_channels
    elif checkpoint.family.denoiser != "unet":
        # A transformer family (SD3.5, FLUX.1): the base checkpoint runs each task its family has
        # a class for (SD3's and FLUX's inpaint pipelines blend the mask in the latents;
        # `Family.check_task` refused the others, naming them).
        fits = task_name in checkpoint.family.tasks(checkpoint.variant)
    else:
        fits = task_name == TEXT_TO_IMAGE
    if task.needs_component and task.needs_component not in checkpoint.components:
        fits = False
    if fits:
        return
    made_for = [
        n
        for n, t in TASKS.items()
        if n != "image-to-image"
        and t.unet_in_channels == checkpoint.unet_in_channels
        and (t.needs_component or "") in checkpoint.components | {""}
    ]
    advice = f"; it is made for model.task: {made_for[0]}" if made_for else ""
    needs = f"a {task.unet_in_channels}-channel UNet" + (
        f" and a {task.needs_component}" if task.needs_component else ""
    )
    pipeline = DEFAULT_FAMILY.pipeline(task_name)
    raise ModelLoadError(
        f"model.task={task_name} loads {pipeline}, which needs {needs}; model.source "
        f"{checkpoint.source} is {checkpoint.describe()}{advice}"
    )


def check_scheduler_names(names: Sequence[str]) -> None:
    """Each name is a scheduler class the installed diffusers defines. Read from diffusers' source,
    not by importing it: diffusers loads torch, which `sdfleet plan` must not."""
    found = importlib.util.find_spec("diffusers")
    folder = Path(found.origin).parent / "schedulers" if found and found.origin else None
    sources = (f.read_text() for f in (folder.rglob("scheduling_*.py") if folder else ()))
    defined = defined_schedulers(sources)
    for name in names:
        if name not in defined:
            raise ModelLoadError(unknown_scheduler(name))


def check_refiner(model: ModelSpec, base: Checkpoint) -> Checkpoint | None:
    """model.refiner's checkpoint, checked as the base's is (safetensors only, model_index.json),
    and one the base's family can hand its latents to: that family's refiner class. Returns what
    was read of it; None without a refiner."""
    if model.refiner is None:
        return None
    ref = CheckpointRef.refiner_of(model)
    check_model_source(ref)
    refiner = read_checkpoint(ref)
    family, theirs = family_of(base.class_name), family_of(refiner.class_name)
    named = f"{ref.key} {ref.source} ({refiner.class_name})"
    if family is None or family.refiner_pipeline is None:
        what = f"an {family.name} checkpoint" if family else f"a {base.class_name}"
        raise SpecError(
            f"{named}: model.source {base.source} is {what}, and "
            f"{family.name if family else 'its family'} has no refiner; remove model.refiner"
        )
    if theirs is not family:
        raise SpecError(
            f"{named} is {'an ' + theirs.name if theirs else 'not an ' + family.name} checkpoint, "
            f"but model.source {base.source} is {family.name}: give an {family.name} refiner "
            f"({family.refiner_pipeline})"
        )
    if refiner.class_name != family.refiner_pipeline:
        raise SpecError(
            f"{named} is not an {family.name} refiner: {family.name}'s refiner checkpoints are "
            f"{family.refiner_pipeline}s (e.g. stabilityai/stable-diffusion-xl-refiner-1.0)"
        )
    return refiner


VAE_CLASS = "AutoencoderKL"


def check_vae(model: ModelSpec, checkpoint: Checkpoint) -> None:
    """model.vae, where set: it exists, holds an AutoencoderKL config and safetensors weights, and
    makes latents of the checkpoint's channel count (another VAE's would fail in every worker's
    first decode). Read from its config.json and file names, never by loading a weight."""
    source = model.vae
    if source is None:
        return
    if kind_of(source) == "missing":
        raise ModelLoadError(
            f"model.vae {source} does not exist; give an AutoencoderKL folder (config.json and "
            "safetensors weights), a hub id or an s3:// folder"
        )
    config = read_config(
        source, "config.json", model.storage_options, model.vae_revision, key="model.vae"
    )
    if config.get("_class_name") != VAE_CLASS:
        found = f"a {config['_class_name']}" if config.get("_class_name") else "no config.json"
        raise ModelLoadError(
            f"model.vae {source} holds {found}, not an {VAE_CLASS} config; point it at the VAE's "
            "own folder (e.g. a checkpoint's vae/ folder, or vae.save_pretrained output)"
        )
    names = _file_names(source, model.storage_options, model.vae_revision)
    if not any(is_safetensors(n) for n in names):
        pickles = pickles_only(names)
        held = f"only pickle weights ({pickles[0]})" if pickles else "no weights"
        raise ModelLoadError(
            f"model.vae {source} holds {held}; sdfleet loads safetensors only: save it with "
            "`vae.save_pretrained(dir, safe_serialization=True)` in a trusted environment"
        )
    channels = config.get("latent_channels", 4)  # AutoencoderKL's default
    if checkpoint.vae_latent_channels is not None and channels != checkpoint.vae_latent_channels:
        raise ModelLoadError(
            f"model.vae {source} makes {channels}-channel latents, and model.source "
            f"{checkpoint.source}'s denoiser works on {checkpoint.vae_latent_channels}; give a VAE "
            "of the checkpoint's family"
        )


def _file_names(source: str, storage_options: dict, revision: str | None) -> list[str]:
    """The files of a model folder, by name relative to it: on disk, on S3 or on the hub (only
    the safetensors weights' name, from the local cache, when offline)."""
    kind = kind_of(source)
    if kind == "local":
        folder = Path(source).expanduser()
        return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    if kind == "remote":
        return list(Storage(source, storage_options).listing())
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        name = "diffusion_pytorch_model.safetensors"
        cached = huggingface_hub.try_to_load_from_cache(source, name, revision=revision)
        return [name] if isinstance(cached, str) else []
    try:
        info = huggingface_hub.model_info(source, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 -- the config was read, so this is rare: one line
        raise ModelLoadError(
            f"cannot list model.vae {source} on the hub: {type(e).__name__}: {first_line(e)[:120]}"
        ) from None
    return [s.rfilename for s in info.siblings or []]
