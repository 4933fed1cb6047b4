"""What a valid `model.scheduler` (or a swept `scheduler`) is: the one rule, in two checks.

The spec checks a name's shape when it is parsed (no diffusers import); the driver then checks
that the installed diffusers defines the class, from diffusers' source (importing diffusers loads
torch, which `sdfleet plan` must not), and the engine finds it by the same name when it loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NAME = re.compile(r"[A-Z][A-Za-z0-9]*Scheduler[A-Za-z0-9]*")
# A scheduler class as diffusers' schedulers/scheduling_*.py define them.
_DEFINITION = re.compile(r"^class (\w+Scheduler\w*)\(", re.M)


def check_scheduler_name(v: str | None) -> str | None:
    """A diffusers scheduler class name, or None (the checkpoint's own); else a ValueError."""
    if v is not None and not _NAME.fullmatch(str(v)):
        raise ValueError(
            f"{v!r} is not a diffusers scheduler class name "
            "(e.g. EulerDiscreteScheduler, DDIMScheduler); use null for the checkpoint's own"
        )
    return v


def scheduler_names(default: str | None, swept: Iterable[str | None] = ()) -> list[str]:
    """The scheduler classes a job names (model.scheduler and sweep.axes.scheduler), sorted."""
    return sorted({default, *swept} - {None})


def defined_schedulers(sources: Iterable[str]) -> set[str]:
    """The scheduler classes the given diffusers scheduler modules' source texts define."""
    return {m.group(1) for text in sources for m in _DEFINITION.finditer(text)}


def unknown_scheduler(name: str) -> str:
    """The error for a name the installed diffusers does not define as a scheduler class."""
    return f"scheduler {name!r} is not a diffusers scheduler class; e.g. EulerDiscreteScheduler"
