"""model.loras' entries: one LoRA file and its scale (the rules on names, files and tensors are
`sdfleet.schemas.lora`'s, which the engine imports without pydantic)."""

from __future__ import annotations

from pydantic import field_validator

from sdfleet.schemas.locations import check_model_location, kind_of
from sdfleet.schemas.lora import LORA_NAME, check_lora_scale
from sdfleet.schemas.section import Section


class LoraSpec(Section):
    # A .safetensors file (local or s3://), or a folder or hub id with weight_name naming the file.
    source: str
    weight_name: str | None = None
    # The adapter's weight: 1.0 as trained, 0 none, up to what the user sweeps.
    scale: float = 1.0
    # The adapter's name in diffusers (set_adapters) and in the rows; null: derived from the file.
    name: str | None = None
    # A hub id's revision (pinned to its commit by the driver); null: main.
    revision: str | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_model_location("source", v)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        return check_lora_scale(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not LORA_NAME.fullmatch(v):
            raise ValueError(
                f"name={v!r}: use 1-64 letters, digits, '_' or '-' (it names the adapter)"
            )
        return v

    def location(self) -> str:
        """The file itself: source, or source/weight_name; a hub id stays as it is (its file is
        weight_name inside the repository)."""
        if self.weight_name is None or kind_of(self.source) == "hub":
            return self.source
        return f"{self.source.rstrip('/')}/{self.weight_name}"

    def file_name(self) -> str:
        return self.weight_name or self.source.rstrip("/").rsplit("/", 1)[-1]
