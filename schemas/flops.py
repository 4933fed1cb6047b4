"""What one image costs in FLOPs: a family's (or variant's) figures counted on meta tensors at its
native size (bench/flops.py), and how they scale to another size, steps, guidance and T5 length.

A UNet family's parts scale with pixels (`Flops` alone). A transformer's do not: attention is
quadratic in its tokens, and its sequence holds the prompt's text tokens too, so a transformer
family's `Flops` carries `TokenFlops`, each part an exact polynomial in its token counts
(`TokenCost`, solved from counts at several sizes by bench/flops_dit.py).

No torch here: `sdfleet plan` and bench/gpu both read it (the family table re-exports `Flops`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenCost:
    """TFLOP of one forward, a polynomial in its tokens: n image tokens (or latent pixels) and
    t text tokens, in one sequence where both are given."""

    constant: float = 0.0
    image: float = 0.0  # per image token (patch embedding, the image stream's projections, MLPs)
    text: float = 0.0  # per text token
    joint_pairs: float = 0.0  # per pair of the n + t tokens (attention over the joint sequence)
    image_pairs: float = 0.0  # per pair of image tokens (attention over the image alone)

    def tflop(self, image_tokens: int, text_tokens: int = 0) -> float:
        n, t = image_tokens, text_tokens
        return (
            self.constant
            + self.image * n
            + self.text * t
            + self.joint_pairs * (n + t) ** 2
            + self.image_pairs * n * n
        )


@dataclass(frozen=True)
class TokenFlops:
    """A transformer family's costs by token counts: the denoiser by image tokens and the joint
    sequence's text tokens, the VAE decode by latent pixels, the T5 encoder by its length."""

    denoiser: TokenCost
    vae_decode: TokenCost
    sequence_encoder: TokenCost  # one prompt through T5, by its max_sequence_length
    clip_tflop: float  # one prompt through the CLIP encoders (always 77 tokens)
    # Text tokens in the denoiser's sequence besides T5's: SD3.5 joins its two CLIP encoders'
    # hidden states channel-wise into 77 tokens ahead of T5's; FLUX.1 reads CLIP's pooled only.
    clip_tokens: int
    sequence_length: int  # the T5 length the Flops' figures are stated at (the variant's default)
    pixels_per_token: int = 16 * 16  # output pixels per image token: VAE 8 x patch 2, each way
    pixels_per_latent: int = 8 * 8

    def denoiser_tflop(self, pixels: int, sequence_length: int) -> float:
        return self.denoiser.tflop(
            pixels // self.pixels_per_token, self.clip_tokens + sequence_length
        )

    def vae_decode_tflop(self, pixels: int) -> float:
        return self.vae_decode.tflop(pixels // self.pixels_per_latent)

    def text_tflop(self, sequence_length: int, sequence_encoder: bool = True) -> float:
        """One prompt's encoders (each denoiser pass has its own prompt: CFG's negative one).
        sequence_encoder: False where the job drops T5 (SD3.5's model.drop_t5: the denoiser still
        reads sequence_length tokens, zeros)."""
        t5 = self.sequence_encoder.tflop(0, sequence_length) if sequence_encoder else 0.0
        return self.clip_tflop + t5


@dataclass(frozen=True)
class Flops:
    """FLOPs of one image, counted on meta tensors at `pixels` output pixels. Without `tokens`
    each part scales with latent pixels (the text encoders' does not) and `text_tflop` is every
    encoder at batch 2 (prompt and negative prompt); with `tokens` (a transformer family) the
    figures are `tokens`' at `pixels` and its T5 length, and `text_tflop` is one prompt's."""

    pixels: int  # the output size the figures were counted at (width x height)
    denoiser_tflop: float  # one denoiser forward for one image (CFG runs two)
    vae_decode_tflop: float
    text_tflop: float
    tokens: TokenFlops | None = None

    def tflop_per_image(
        self,
        width: int,
        height: int,
        steps: int,
        passes: int,
        denoised_pixels: int | None = None,
        sequence_length: int | None = None,
        sequence_encoder: bool = True,
    ) -> float:
        """passes: denoiser forwards per step (2 with classifier-free guidance, else 1).
        denoised_pixels: the output pixels whose latent the denoiser runs on, where that is not
        the image's own (the x4 upscaler denoises a latent of its input's size).
        sequence_length: the T5 tokens read (None: the length the figures are stated at);
        sequence_encoder: False where the job drops T5."""
        if self.tokens is not None:
            return self._tflop_by_tokens(
                width * height, steps, passes, denoised_pixels, sequence_length, sequence_encoder
            )
        scale = width * height / self.pixels
        denoised = scale if denoised_pixels is None else denoised_pixels / self.pixels
        return (
            self.denoiser_tflop * passes * steps * denoised
            + self.vae_decode_tflop * scale
            + self.text_tflop
        )

    def _tflop_by_tokens(
        self,
        pixels: int,
        steps: int,
        passes: int,
        denoised_pixels: int | None,
        sequence_length: int | None,
        sequence_encoder: bool,
    ) -> float:
        tokens = self.tokens
        length = tokens.sequence_length if sequence_length is None else sequence_length
        denoised = pixels if denoised_pixels is None else denoised_pixels
        return (
            tokens.denoiser_tflop(denoised, length) * passes * steps
            + tokens.vae_decode_tflop(pixels)
            + tokens.text_tflop(length, sequence_encoder) * passes
        )

    def stated_by_tokens(self) -> list[str]:
        """Where the stated figures differ from `tokens`' at `pixels` (within 0.05%); empty
        without `tokens`. A family table's check (its test, bench/flops.py --check)."""
        if self.tokens is None:
            return []
        length = self.tokens.sequence_length
        wrong = []
        for part, stated, computed in (
            ("denoiser", self.denoiser_tflop, self.tokens.denoiser_tflop(self.pixels, length)),
            ("vae decode", self.vae_decode_tflop, self.tokens.vae_decode_tflop(self.pixels)),
            ("text", self.text_tflop, self.tokens.text_tflop(length)),
        ):
            if abs(stated - computed) > 5e-4 * abs(computed):
                wrong.append(f"{part}: stated {stated}, its tokens give {computed:.4f}")
        return wrong
