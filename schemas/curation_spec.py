"""`curation`: the scores computed in the job from one CLIP image embedding per image, their gates,
best-of-N and dedup (the worker side is sdfleet.actors.curation and sdfleet.actors.selection)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sdfleet.schemas.section import Section


class CurationSpec(Section):
    """Scores computed in the job from one CLIP image embedding per image (sdfleet.actors.curation)."""

    # A transformers CLIP checkpoint (local, s3:// or hub id; safetensors): clip_score per row, and the
    # embedding the heads read. null: no curation scores.
    clip_model: str | None = None
    # The LAION aesthetic predictor's head (aesthetic_score) and the LAION CLIP-based NSFW
    # classifier's head (punsafe), each a safetensors file converted once from the original.
    aesthetic_model: str | None = None
    nsfw_model: str | None = None
    # Gates: an image under a minimum or over the maximum is `rejected` (not in the tars), with the
    # gates it failed in `rejected_by`. The model card's LAION filter: max_punsafe 0.1, min_aesthetic 4.5.
    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    max_punsafe: float | None = Field(None, ge=0.0, le=1.0)
    # Best-of-N: each prompt (per sweep point) owns max_candidates seeds (candidate slots); the
    # worker generates images_per_prompt of them first, then more only for prompts short of that
    # many passing, until they have them or every slot is tried. null: every slot is generated.
    images_per_prompt: int | None = Field(None, ge=1)
    max_candidates: int | None = Field(None, ge=1, le=10_000)
    # An image whose embedding has at least this cosine with an image already accepted for the same
    # prompt (and sweep point) is a `duplicate` of it.
    dedup_threshold: float | None = Field(None, gt=0.0, le=1.0)
    # Write each shard's image embeddings and their keys beside its tar (schemas.layout names the
    # files), committed with it: an index for retrieval or dedup is built from them after the job.
    save_embeddings: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _scorers_for_what_reads_them(self):
        for key in ("aesthetic_model", "nsfw_model"):
            if getattr(self, key) and not self.clip_model:
                raise ValueError(
                    f"curation.{key} reads CLIP image embeddings: set curation.clip_model to the "
                    "CLIP checkpoint the head was trained on (ViT-L/14 for LAION's)"
                )
        for gate, scorer in CURATION_GATES.items():
            if getattr(self, gate) is not None and not getattr(self, scorer):
                raise ValueError(
                    f"curation.{gate} needs curation.{scorer}, the model whose score it gates"
                )
        if self.dedup_threshold is not None and not self.clip_model:
            raise ValueError(
                "curation.dedup_threshold compares CLIP image embeddings: set curation.clip_model"
            )
        if self.save_embeddings and not self.clip_model:
            raise ValueError(
                "curation.save_embeddings writes CLIP image embeddings: set curation.clip_model"
            )
        if self.max_candidates is not None and self.images_per_prompt is None:
            raise ValueError(
                f"curation.max_candidates={self.max_candidates} needs curation.images_per_prompt, "
                "the number of images to keep per prompt"
            )
        if self.images_per_prompt is not None and self.candidates < self.images_per_prompt:
            raise ValueError(
                f"curation.max_candidates={self.max_candidates} is under curation.images_per_prompt="
                f"{self.images_per_prompt}: a prompt could never have that many images"
            )
        return self

    @property
    def best_of_n(self) -> bool:
        return self.images_per_prompt is not None

    @property
    def candidates(self) -> int:
        """Candidate slots per prompt and sweep point (1 without best-of-N)."""
        if not self.best_of_n:
            return 1
        return self.max_candidates or self.images_per_prompt

    @property
    def gates(self) -> dict[str, float]:
        return {g: getattr(self, g) for g in CURATION_GATES if getattr(self, g) is not None}


# Each gate and the model whose score it reads.
CURATION_GATES = {
    "min_clip_score": "clip_model",
    "min_aesthetic": "aesthetic_model",
    "max_punsafe": "nsfw_model",
}
