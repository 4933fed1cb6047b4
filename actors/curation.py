"""Curation scores, computed in the job on the actor's device: one CLIP image embedding per image,
and the scorers that read it.

- clip_score: CLIPScore as torchmetrics defines it (100 x the cosine of the image's and the prompt's
  CLIP embeddings, clipped at 0), the same number `sdfleet score` gives; each prompt is embedded once.
- aesthetic_score: the LAION aesthetic predictor, an MLP head on the image embedding.
- punsafe: the LAION CLIP-based NSFW classifier's head, the probability the image is unsafe.

Heads are safetensors files (`load_head` says the layout); sdfleet never loads the originals, which
ship as PyTorch pickles or Keras models (the README says how to convert them once, in a trusted
environment).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdfleet.actors.model_cache import local_copy, weights_sha256
from sdfleet.schemas.errors import ModelLoadError, first_line
from sdfleet.schemas.rows import STATUS_DUPLICATE, STATUS_FILTERED, STATUS_OK, STATUS_REJECTED
from sdfleet.schemas.weights import is_safetensors

log = logging.getLogger("sdfleet")

# Prompt embeddings kept per worker: a shard's prompts repeat across its sweep points and seeds,
# and a few thousand 768-float vectors are a few MB.
PROMPT_CACHE_SIZE = 4096
# What a head file must say it is (safetensors metadata `sdfleet_head`), so an aesthetic head is
# never read as an NSFW one.
HEAD_KINDS = ("aesthetic", "nsfw")


def clip_score(image_embeds, text_embeds):
    """CLIPScore per row: 100 * cosine similarity, clipped at 0 (torchmetrics' definition)."""
    img = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    txt = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (100 * (img * txt).sum(dim=-1)).clamp(min=0)


class ClipModel:
    """A transformers CLIPModel and its CLIPProcessor (safetensors only) on one device."""

    def __init__(
        self,
        source: str,
        device: str,
        storage_options: dict[str, Any] | None = None,
        what: str = "curation.clip_model",
    ):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.local = local_copy(source, storage_options)
        try:
            self.model = (
                CLIPModel.from_pretrained(self.local, use_safetensors=True).eval().to(device)
            )
            self.processor = CLIPProcessor.from_pretrained(self.local)
        except OSError as e:
            raise ModelLoadError(
                f"{what} {source}: cannot load a CLIPModel and CLIPProcessor with safetensors "
                f"weights from it ({first_line(e)})"
            ) from e
        self.source, self.device, self.torch = source, device, torch
        self._prompts: dict[str, Any] = {}

    @property
    def embedding_size(self) -> int:
        return self.model.config.projection_dim

    def pixel_values(self, image) -> Any:
        """The model's input (3, h, w) for one RGB PIL image; safe to call from worker threads."""
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][
            0
        ]

    def image_embeds(self, pixel_values: list) -> Any:
        with self.torch.no_grad():
            return _projected(
                self.model.get_image_features(
                    pixel_values=self.torch.stack(pixel_values).to(self.device)
                )
            )

    def normalized_image_embeds(self, images: list[np.ndarray]) -> Any:
        """The L2-normalized image embedding of each RGB array: what the heads and dedup read."""
        from PIL import Image

        embeds = self.image_embeds([self.pixel_values(Image.fromarray(a)) for a in images])
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_embeds(self, texts: list[str]) -> Any:
        """One embedding per text; prompts seen before come from the cache. Prompts longer than the
        text encoder's context are truncated by the tokenizer, keeping the end token, as diffusers
        does when it encodes them."""
        new = sorted({t for t in texts if t not in self._prompts})
        if new:
            max_len = self.model.config.text_config.max_position_embeddings
            inputs = self.processor.tokenizer(
                new, return_tensors="pt", padding=True, truncation=True, max_length=max_len
            )
            with self.torch.no_grad():
                embeds = _projected(
                    self.model.get_text_features(
                        **{k: v.to(self.device) for k, v in inputs.items()}
                    )
                )
            if len(self._prompts) + len(new) > PROMPT_CACHE_SIZE:
                self._prompts.clear()
            self._prompts.update(zip(new, embeds))
        return self.torch.stack([self._prompts[t] for t in texts])


def _projected(features):
    """The projected embedding: transformers 5 returns it as the output's pooler_output, 4 as a tensor."""
    return features if hasattr(features, "norm") else features.pooler_output


class Head:
    """An MLP head on the L2-normalized image embedding, from a safetensors file:
    `layers.{i}.weight` (out x in, as torch.nn.Linear) and `layers.{i}.bias` for i = 0, 1, ...;
    optionally `input_mean` and `input_variance` (a Keras Normalization layer before the first);
    metadata `sdfleet_head` (aesthetic | nsfw), `hidden_activation` (none | relu) and `output`
    (identity | sigmoid)."""

    def __init__(self, path: str, kind: str, device: str, embedding_size: int, what: str):
        import torch
        from safetensors import safe_open

        if not is_safetensors(str(path)):
            raise ModelLoadError(
                f"{what} {path} is not a .safetensors file; sdfleet loads heads from safetensors "
                "only: convert the original once, in a trusted environment (see the README)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise ModelLoadError(
                f"{what} {path} is not a readable safetensors file: {first_line(e)}"
            ) from None
        if meta.get("sdfleet_head") != kind:
            raise ModelLoadError(
                f"{what} {path} says it is a {meta.get('sdfleet_head')!r} head, not {kind!r} "
                "(safetensors metadata sdfleet_head)"
            )
        count = sum(1 for k in tensors if k.startswith("layers.") and k.endswith(".weight"))
        self.layers = [
            (
                tensors[f"layers.{i}.weight"].float().to(device),
                tensors[f"layers.{i}.bias"].float().to(device),
            )
            for i in range(count)
        ]
        if not self.layers or self.layers[0][0].shape[1] != embedding_size:
            found = self.layers[0][0].shape[1] if self.layers else "no layers"
            raise ModelLoadError(
                f"{what} {path} takes {found}-wide embeddings, but curation.clip_model's are "
                f"{embedding_size}: use the head made for that CLIP model"
            )
        self.mean = tensors.get("input_mean")
        self.variance = tensors.get("input_variance")
        self.relu = meta.get("hidden_activation", "none") == "relu"
        self.sigmoid = meta.get("output", "identity") == "sigmoid"
        self.torch, self.device = torch, device
        self.sha256 = weights_sha256(path)

    def __call__(self, normalized):
        x = normalized.float()
        if self.mean is not None:
            x = (x - self.mean.to(self.device)) / self.torch.sqrt(
                self.variance.to(self.device) + 1e-7
            )
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if self.relu and i < len(self.layers) - 1:
                x = x.clamp(min=0)
        x = x[:, 0]
        return self.torch.sigmoid(x) if self.sigmoid else x


@dataclass
class CurationScores:
    clip_score: float | None
    aesthetic_score: float | None
    punsafe: float | None
    embedding: np.ndarray | None = None  # the L2-normalized CLIP image embedding (float32)

    def failed_gates(self, gates: dict[str, float]) -> list[str]:
        """The gates (curation.min_clip_score, min_aesthetic, max_punsafe) this image fails; the
        bounds themselves pass."""
        values = {
            "min_clip_score": self.clip_score,
            "min_aesthetic": self.aesthetic_score,
            "max_punsafe": self.punsafe,
        }
        return [
            g
            for g, bound in gates.items()
            if (values[g] > bound if g.startswith("max_") else values[g] < bound)
        ]


class Curator:
    """Loaded once per actor from the spec's `curation` section; scores batches of images."""

    def __init__(self, spec, device: str):
        self.clip = ClipModel(spec.clip_model, device, spec.storage_options)
        size = self.clip.embedding_size
        self.aesthetic = self._head(
            spec.aesthetic_model, "aesthetic", device, size, spec, "curation.aesthetic_model"
        )
        self.nsfw = self._head(spec.nsfw_model, "nsfw", device, size, spec, "curation.nsfw_model")
        self.models_sha256 = {
            "clip_model": weights_sha256(self.clip.local),
            **({"aesthetic_model": self.aesthetic.sha256} if self.aesthetic else {}),
            **({"nsfw_model": self.nsfw.sha256} if self.nsfw else {}),
        }

    @staticmethod
    def _head(source, kind, device, size, spec, what):
        return (
            Head(local_copy(source, spec.storage_options), kind, device, size, what)
            if source
            else None
        )

    def score(self, images: list[np.ndarray], prompts: list[str]) -> list[CurationScores]:
        """One image embedding per image, read by every scorer."""
        normalized = self.clip.normalized_image_embeds(images)
        scores = clip_score(normalized, self.clip.text_embeds(prompts)).float().cpu().tolist()
        aesthetic = (
            self.aesthetic(normalized).cpu().tolist() if self.aesthetic else [None] * len(images)
        )
        punsafe = self.nsfw(normalized).cpu().tolist() if self.nsfw else [None] * len(images)
        embeddings = normalized.float().cpu().numpy()
        return [CurationScores(*v) for v in zip(scores, aesthetic, punsafe, embeddings)]


def tally(
    rows: list[dict[str, Any]], axes: list[str], images_per_prompt: int | None
) -> dict[str, Any]:
    """One shard's curation counts, for its stats (summed over shards for the card):
    - gated: images that reached the gates (passed safety); gate_failures: of those, how many failed
      each gate (an image failing two counts under both);
    - by_sweep_point: per sweep point (its axis values, "all" without axes) the candidates generated
      and kept, and with best-of-N its prompts and how many of them are short of k kept images
      (a prompt's candidates share a shard, so these add up over shards)."""
    gated = [r for r in rows if r["status"] in (STATUS_OK, STATUS_REJECTED, STATUS_DUPLICATE)]
    failures: dict[str, int] = {}
    for r in gated:
        for gate in filter(None, (r.get("rejected_by") or "").split(",")):
            failures[gate] = failures.get(gate, 0) + 1
    points: dict[str, dict[str, Any]] = {}
    for r in rows:
        label = ", ".join(f"{a}={r[a]}" for a in sorted(axes)) or "all"
        p = points.setdefault(label, {"generated": 0, "ok": 0, "kept_by_prompt": {}})
        made = r["status"] in (STATUS_OK, STATUS_FILTERED, STATUS_REJECTED, STATUS_DUPLICATE)
        p["generated"] += made
        p["ok"] += r["status"] == STATUS_OK
        p["kept_by_prompt"][r["prompt_id"]] = p["kept_by_prompt"].get(r["prompt_id"], 0) + (
            r["status"] == STATUS_OK
        )
    by_point = {}
    for label, p in sorted(points.items()):
        kept = p.pop("kept_by_prompt")
        if images_per_prompt is not None:
            p.update(prompts=len(kept), short=sum(n < images_per_prompt for n in kept.values()))
        by_point[label] = p
    return {
        "gated": len(gated),
        "gate_failures": dict(sorted(failures.items())),
        "by_sweep_point": by_point,
    }
