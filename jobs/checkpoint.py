"""What the driver checks of a checkpoint before any worker starts: its weight formats, that it
fits the task, its native size and the scheduler names. Read from JSON configs and diffusers'
source, never by loading a weight, so `sdfleet plan` and `sdfleet run`'s driver stay free of torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from sdfleet.actors.model_content import HUB_TIMEOUT_S
from sdfleet.actors.storage import Storage
from sdfleet.schemas.errors import ModelLoadError, first_line
from sdfleet.schemas.families import DEFAULT_FAMILY, vae_scale_factor
from sdfleet.schemas.locations import kind_of
from sdfleet.schemas.schedulers import defined_schedulers, unknown_scheduler
from sdfleet.schemas.spec import ModelSpec
from sdfleet.schemas.tasks import TASKS, TEXT_TO_IMAGE
from sdfleet.schemas.weights import is_safetensors, pickles_only


def check_model_source(model: ModelSpec) -> None:
    """What the driver can check of the model before any worker starts: the folder and its weight
    formats (safetensors only, per component), or that a hub id can be had at all."""
    source = model.source
    kind = kind_of(source)
    if kind == "remote":
        if not Storage(source, model.storage_options).exists("model_index.json"):
            raise ModelLoadError(
                f"model.source {source} has no model_index.json; point it at a diffusers folder"
            )
    elif kind == "local":
        _check_local_pipeline(Path(source).expanduser())
    elif kind == "missing":
        raise ModelLoadError(f"model.source {source} does not exist")
    else:
        _check_hub_pipeline(source, model.revision)


def _check_local_pipeline(folder: Path) -> None:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.source {folder} is a local path without model_index.json; point it at a "
            "diffusers pipeline folder (save_pretrained output)"
        )
    # Every component with weights must have them as safetensors: one pickle-only component would
    # fail only inside the workers.
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = pickles_only(p.name for p in component.rglob("*"))
        if pickles:
            raise ModelLoadError(
                f"model.source {folder} holds only pickle weights for {component.name} "
                f"({pickles[0]}); sdfleet loads safetensors only. Convert it with "
                "`pipe.save_pretrained(dir, safe_serialization=True)` in a trusted environment"
            )


def _check_hub_pipeline(repo: str, revision: str | None) -> None:
    """A hub id: in the local cache when offline, else on a hub that answers, with safetensors."""
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    advice = "point model.source at a local folder or an s3:// mirror"
    if hub_constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if not isinstance(cached, str):
            raise ModelLoadError(
                f"model.source {repo} is a hub id, HF_HUB_OFFLINE is set and the local Hugging "
                f"Face cache does not hold it: {advice}"
            )
        return
    try:
        info = huggingface_hub.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 -- network, not found, gated: each is said in one line
        kind = type(e).__name__
        if "NotFound" in kind or "Gated" in kind:
            raise ModelLoadError(
                f"model.source {repo}: the hub has no such model you may read ({kind}); {advice}, "
                "or log in with a token that may read it"
            ) from None
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub for {repo} ({kind}: {first_line(e)[:120]}): "
            f"{advice}, or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None
    names = [s.rfilename for s in info.siblings or []]
    if names and not any(is_safetensors(n) for n in names):
        raise ModelLoadError(
            f"model.source {repo} has no safetensors weights on the hub; sdfleet loads "
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
    sample_size: int | None  # the UNet's latent size
    vae_scale_factor: int
    prediction_type: str | None

    @property
    def default_size(self) -> int | None:
        """The size it was trained at (512-base: 64 * 8, 768-v: 96 * 8), or None where unknown."""
        return DEFAULT_FAMILY.native_size(self.sample_size, self.vae_scale_factor)

    def describe(self) -> str:
        unet = (
            f" with a {self.unet_in_channels}-channel UNet"
            if self.unet_in_channels is not None
            else ""
        )
        return f"a {self.class_name or 'diffusers pipeline'}{unet}"


def read_checkpoint(model: ModelSpec) -> Checkpoint:
    """Read model_index.json and the UNet's and VAE's configs from a local folder, an s3:// mirror
    or the hub (its cache when offline), without loading a weight."""
    source = model.source
    kind = kind_of(source)

    def config(name: str) -> dict:
        try:
            if kind == "remote":
                storage = Storage(source, model.storage_options)
                return storage.read_json(name) if storage.exists(name) else {}
            if kind == "local":
                local = Path(source).expanduser()
                return json.loads((local / name).read_text()) if (local / name).is_file() else {}
            import huggingface_hub

            try:
                return json.loads(
                    Path(
                        huggingface_hub.hf_hub_download(source, name, revision=model.revision)
                    ).read_text()
                )
            except huggingface_hub.errors.EntryNotFoundError:
                return {}
            except Exception as e:
                raise OSError(
                    f"the hub did not give it: {type(e).__name__}: {first_line(e)}"
                ) from e
        except (OSError, ValueError) as e:  # ValueError: not JSON
            raise ModelLoadError(
                f"cannot read {name} of model.source {source}: {type(e).__name__}: {first_line(e)}"
            ) from None

    index = config("model_index.json")
    unet = config("unet/config.json") if "unet" in index else {}
    vae = config("vae/config.json") if "vae" in index else {}
    scheduler = config("scheduler/scheduler_config.json") if "scheduler" in index else {}
    return Checkpoint(
        source=source,
        class_name=index.get("_class_name"),
        components=frozenset(k for k in index if not k.startswith("_")),
        unet_in_channels=unet.get("in_channels"),
        sample_size=unet.get("sample_size"),
        vae_scale_factor=vae_scale_factor(vae),
        prediction_type=scheduler.get("prediction_type"),
    )


def check_task(task_name: str, checkpoint: Checkpoint) -> None:
    """The checkpoint is one the task can run: its UNet takes the task's conditioning channels and
    it has the task's extra component. Else the error names both, before any GPU starts."""
    task = TASKS[task_name]
    fits = (
        checkpoint.unet_in_channels == task.unet_in_channels
        if checkpoint.unet_in_channels is not None
        else task_name == TEXT_TO_IMAGE
    )
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
