"""The base of every spec section: unknown keys are errors (a typo such as `guidence_scale` must
not silently use the default), and an assignment (`--set`) is validated as a load is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
