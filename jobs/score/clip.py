"""CLIP score for `sdfleet score`: the job's own CLIP model and score (torchmetrics' CLIPScore), with provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdfleet.actors.curation import ClipModel, clip_score
from sdfleet.actors.model_cache import weights_sha256
from sdfleet.jobs.score.sanity import looks_untrained


class ClipScorer(ClipModel):
    """A CLIP checkpoint on one device: local folder, s3:// folder (copied once per node) or hub id.

    `info` is its provenance for the summary: source, parameter count, whether it looks untrained,
    and the hash of its files (None for a hub id).
    """

    def __init__(self, source: str, device: str, storage_options: dict[str, Any] | None = None):
        super().__init__(source, device, storage_options, what="--clip-model")
        self.info = {
            "source": source,
            "params": sum(p.numel() for p in self.model.parameters()),
            "untrained": looks_untrained(self.model, (torch.nn.LayerNorm,)),
            "sha256": weights_sha256(self.local) if Path(self.local).exists() else None,
        }

    def scores(self, pixel_values: list[torch.Tensor], texts: list[str]) -> list[float]:
        """CLIPScore per (image, text) pair, as the job's curation computes it (`actors.curation`).

        Prompts longer than the text encoder's context are truncated by the tokenizer, which keeps
        the end token (as diffusers does when it encodes them); torchmetrics slices the ids instead.
        The two agree on every prompt that fits, e.g. all COCO captions.
        """
        return (
            clip_score(self.image_embeds(pixel_values), self.text_embeds(texts))
            .float()
            .cpu()
            .tolist()
        )
