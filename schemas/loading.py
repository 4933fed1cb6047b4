"""From a spec file to a spec: `--set` overrides, the file's relative paths, and validation
errors said per key. `sdfleet.schemas.spec.load_spec` runs them in that order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.locations import written_as_path

if TYPE_CHECKING:
    from sdfleet.schemas.spec import JobSpec


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a raw spec dict; the value is parsed as YAML (safe_load)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r} has no '='; write it as --set section.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise SpecError(f"--set {assignment!r} names no key; write it as --set section.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {p!r} holds {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def resolve_relative_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Relative local paths in a spec file are relative to the file's folder, not to where the
    command runs (docker compose's rule), and are kept absolute: errors show where they point and
    the rows' model_source regenerates from anywhere. input.uri and output.uri are paths whenever
    they are not URIs; model.source, model.vae and safety.model may also be hub ids, so they count as paths
    only if written as one (./, ../, ~; `locations.written_as_path`) or if they name something
    that exists."""

    def resolved(value: str | None, maybe_hub_id: bool) -> str | None:
        if value is None or "://" in value or Path(value).expanduser().is_absolute():
            return value
        candidate = base / value
        if maybe_hub_id and not (written_as_path(value) or candidate.exists()):
            return value
        return str(candidate.resolve())

    updates = {
        "input": spec.input.model_copy(update={"uri": resolved(spec.input.uri, False)}),
        "output": spec.output.model_copy(update={"uri": resolved(spec.output.uri, False)}),
        "model": spec.model.model_copy(
            update={
                "source": resolved(spec.model.source, True),
                "refiner": spec.model.refiner
                and spec.model.refiner.model_copy(
                    update={"source": resolved(spec.model.refiner.source, True)}
                ),
                "vae": resolved(spec.model.vae, True),
            }
        ),
        "safety": spec.safety.model_copy(update={"model": resolved(spec.safety.model, True)}),
        "curation": spec.curation.model_copy(
            update={
                "clip_model": resolved(spec.curation.clip_model, True),
                "aesthetic_model": resolved(spec.curation.aesthetic_model, False),
                "nsfw_model": resolved(spec.curation.nsfw_model, False),
            }
        ),
    }
    return spec.model_copy(update=updates)


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
            lines.append(f"  {key}={err.get('input')!r}: {msg}")
    return "\n".join(lines)
