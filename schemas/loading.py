"""From a spec file to a spec: `--set` overrides, the file's relative paths, and validation
errors said per key. `sdfleet.schemas.spec.load_spec` runs them in that order.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.locations import written_as_path

if TYPE_CHECKING:
    from sdfleet.schemas.spec import JobSpec


def apply_override(
    data: dict[str, Any], assignment: str, model: type[BaseModel] | None = None
) -> None:
    """Apply one ``a.b.c=value`` to a raw spec dict. The value is parsed as YAML (safe_load), as
    the spec file's values are, except that a key that takes text keeps the text as written where
    YAML would make it something that key does not take (`yes`, `on`, `null`, `1.0`, a date):
    `--set generation.negative_prompt=yes` is the string "yes", `engine.compile=off` is "off".
    model: the spec's class, whose field types say which keys take text."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r} has no '='; write it as --set section.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in override_key(assignment).split(".") if p]
    if not parts:
        raise SpecError(f"--set {assignment!r} names no key; write it as --set section.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if model is not None and _takes_text_not(_field_type(model, parts), value):
        value = raw.strip()
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {p!r} holds {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def _field_type(model: type[BaseModel], parts: list[str]) -> Any:
    """The declared type of the key at `parts` (None: not a declared field, e.g. a key inside
    storage_options, which pydantic then judges as it is)."""
    annotation: Any = model
    for p in parts:
        section = next((t for t in _members(annotation) if _is_model(t)), None)
        if section is None or p not in section.model_fields:
            return None
        annotation = section.model_fields[p].annotation
    return annotation


def _takes_text_not(annotation: Any, value: Any) -> bool:
    """Whether the key takes text (str, or a Literal of strings) but not this parsed scalar."""
    if annotation is None or isinstance(value, (str, list, dict)):
        return False
    accepted: set[type] = set()
    for t in _members(annotation):
        if typing.get_origin(t) is Literal:
            accepted.update(type(v) for v in typing.get_args(t))
        elif isinstance(t, type):
            accepted.add(t)
    if str not in accepted:
        return False
    if float in accepted and type(value) is int:
        return False  # a float key takes an integer as it is written
    return type(value) not in accepted


def _members(annotation: Any) -> tuple[Any, ...]:
    """A union's members (X | None, Optional[X], Union[...]); anything else alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def resolve_relative_paths(
    spec: JobSpec,
    base: Path,
    command_line_keys: tuple[str, ...] = (),
    working_dir: Path | None = None,
) -> JobSpec:
    """The one rule for relative local paths: a value in the spec file is relative to the file's
    folder, not to where the command runs (docker compose's rule), so a spec means the same from
    wherever it is run; a value written on the command line (`--set key=value`, as every flag's
    path, e.g. `score --clip-model`) is relative to the working directory, as a shell user expects
    of anything typed there. Both are kept absolute: errors and `plan` show where they point and
    the rows' model_source regenerates from anywhere.

    command_line_keys: the dotted keys `--set` assigned (a key under an assigned section counts);
    working_dir: their base (default: the current directory). input.uri and output.uri are paths
    whenever they are not URIs; model.source, model.vae and safety.model may also be hub ids, so
    model.loras' sources likewise;
    they count as paths only if written as one (./, ../, ~; `locations.written_as_path`) or if
    they name something that exists."""
    here = working_dir or Path.cwd()

    def resolved(key: str, value: str | None, maybe_hub_id: bool) -> str | None:
        from_command_line = any(key == k or key.startswith(k + ".") for k in command_line_keys)
        return absolute_local_path(value, here if from_command_line else base, maybe_hub_id)

    model, refiner, cur = spec.model, spec.model.refiner, spec.curation
    updates = {
        "input": spec.input.model_copy(
            update={"uri": resolved("input.uri", spec.input.uri, False)}
        ),
        "output": spec.output.model_copy(
            update={"uri": resolved("output.uri", spec.output.uri, False)}
        ),
        "model": model.model_copy(
            update={
                "source": resolved("model.source", model.source, True),
                "refiner": refiner
                and refiner.model_copy(
                    update={"source": resolved("model.refiner.source", refiner.source, True)}
                ),
                "vae": resolved("model.vae", model.vae, True),
                "loras": [
                    lora.model_copy(update={"source": resolved("model.loras", lora.source, True)})
                    for lora in model.loras
                ],
            }
        ),
        "safety": spec.safety.model_copy(
            update={"model": resolved("safety.model", spec.safety.model, True)}
        ),
        "curation": cur.model_copy(
            update={
                "clip_model": resolved("curation.clip_model", cur.clip_model, True),
                "aesthetic_model": resolved("curation.aesthetic_model", cur.aesthetic_model, False),
                "nsfw_model": resolved("curation.nsfw_model", cur.nsfw_model, False),
            }
        ),
    }
    return spec.model_copy(update=updates)


def absolute_local_path(value: str | None, base: Path, maybe_hub_id: bool = False) -> str | None:
    """`value` made absolute against `base` if it is a relative local path; a URI, an absolute
    path and None as they are. maybe_hub_id: the value may also be a hub id, so it counts as a
    path only if written as one (./, ../, ~; `locations.written_as_path`) or if it exists."""
    if value is None or "://" in value or Path(value).expanduser().is_absolute():
        return value
    candidate = base / value
    if maybe_hub_id and not (written_as_path(value) or candidate.exists()):
        return value
    return str(candidate.resolve())


# Every spec key that may name a local path (what `resolve_relative_paths` resolves), in the order
# `plan` shows them.
PATH_KEYS = (
    "input.uri",
    "output.uri",
    "model.source",
    "model.refiner.source",
    "model.vae",
    "safety.model",
    "curation.clip_model",
    "curation.aesthetic_model",
    "curation.nsfw_model",
)


def resolved_locations(spec: JobSpec) -> dict[str, str]:
    """Each set PATH_KEYS value as the loaded spec holds it: absolute for a local path, else the URI
    or hub id as written (for `plan` to show the user where things resolved)."""
    out = {}
    for key in PATH_KEYS:
        value: Any = spec
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and value:
            out[key] = value
    for i, lora in enumerate(spec.model.loras):
        out[f"model.loras[{i}].source"] = lora.source
    return out


def override_key(assignment: str) -> str:
    """The dotted key a `--set key=value` assigns (as `apply_override` reads it)."""
    return ".".join(p for p in assignment.split("=", 1)[0].strip().split(".") if p)


def format_validation_error(e: ValidationError, data: dict[str, Any], source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  {key}: unknown key (check the spelling; `sdfleet` accepts only documented keys)"
            )
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif not key:  # a check across sections names its keys itself
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if _unquoted_text(err):
                msg += (
                    f"; YAML read the unquoted value as {err['input']!r}: quote it in the spec file"
                )
            lines.append(f"  {key}={err.get('input')!r}: {msg}")
    return "\n".join(lines)


def _unquoted_text(err: dict[str, Any]) -> bool:
    """Whether a key that takes text was given what YAML makes of unquoted yes, off, null, 1.0 or
    a date (a Literal key only of the words YAML takes for true, false and null)."""
    value = err.get("input")
    if err["type"] == "literal_error":
        return value is None or isinstance(value, bool)
    return err["type"] == "string_type" and (
        value is None or isinstance(value, (bool, int, float, dt.date))
    )
