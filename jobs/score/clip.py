"""CLIP score as torchmetrics' CLIPScore defines it, with a transformers CLIPModel and CLIPProcessor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from sdfleet.actors.storage import local_copy, weights_sha256
from sdfleet.jobs.score.sanity import looks_untrained
from sdfleet.schemas.errors import ModelLoadError, first_line


class ClipScorer:
    """A CLIP checkpoint on one device: local folder, s3:// folder (copied once per node) or hub id.

    `info` is its provenance for the summary: source, parameter count, whether it looks untrained,
    and the hash of its files (None for a hub id).
    """

    def __init__(self, source: str, device: str, storage_options: dict[str, Any] | None = None):
        local = local_copy(source, storage_options)
        try:
            self.model = CLIPModel.from_pretrained(local, use_safetensors=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(local)
        except OSError as e:
            raise ModelLoadError(f"--clip-model {source}: cannot load a CLIPModel and CLIPProcessor with "
                                 f"safetensors weights from it ({first_line(e)})") from e
        self.device = device
        self.info = {"source": source, "params": sum(p.numel() for p in self.model.parameters()),
                     "untrained": looks_untrained(self.model, (torch.nn.LayerNorm,)),
                     "sha256": weights_sha256(local) if Path(local).exists() else None}

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The model's input (3, h, w) for one RGB image; safe to call from worker threads."""
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def scores(self, pixel_values: list[torch.Tensor], texts: list[str]) -> list[float]:
        """CLIPScore per (image, text) pair: 100 * cosine similarity of the embeddings, clipped at 0.

        Prompts longer than the text encoder's context are truncated by the tokenizer, which keeps
        the end token (as diffusers does when it encodes them); torchmetrics slices the ids instead.
        The two agree on every prompt that fits, e.g. all COCO captions.
        """
        max_len = self.model.config.text_config.max_position_embeddings
        inputs = dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                               max_length=max_len))
        inputs["pixel_values"] = torch.stack(pixel_values)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
            img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            score = (100 * (img * txt).sum(dim=-1)).clamp(min=0)
        return score.float().cpu().tolist()
