"""FLOPs of the full-size models, counted on meta tensors: what `schemas/families.py` states.

Builds each family's denoiser, VAE decoder and text encoders from their published configs on the
meta device (no weights, no memory, no download) and runs one forward under
`torch.utils.flop_counter.FlopCounterMode`. Attention goes through diffusers' explicit
`AttnProcessor` and transformers' "eager" attention, so its matmuls are counted (the fused kernels
have no FLOP formula on every device).

    python bench/flops.py            # the table, TFLOP
    python bench/flops.py --check    # ... and exit 1 where a count differs from the family table
    python bench/flops.py --write    # ... and write the transformers' to schemas/family_flops.py

The transformer families (SD3.5, FLUX.1) are bench/flops_dit.py's: their parts are polynomials in
their token counts, solved from counts at several sizes and checked at another; below, the UNet
families'.

What is counted, as the table states it (`Flops`):
- denoiser: one UNet forward for ONE image (batch 1) at the family's counting size; CFG runs two.
- vae_decode: one VAE decode (post_quant_conv + decoder) for one image at that size.
- text: every text encoder over 77 tokens at batch 2 (the prompt and the negative prompt).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# SD2-base (stabilityai/stable-diffusion-2-base): the configs bench/sd2_base.py builds.
from sd2_base import TEXT as SD2_TEXT
from sd2_base import UNET as SD2_UNET
from sd2_base import VAE as SD2_VAE

# SDXL-base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json as documented with
# diffusers' SDXL pipeline and quoted in /work/shared/FACTS.md): three blocks, no attention in the
# first, 1/2/10 transformer layers, heads of 64 channels, cross-attention over both encoders'
# concatenated hidden states (768 + 1280 = 2048), and the "text_time" added embedding of the pooled
# projection (1280) plus six size/crop ids of 256 each (1280 + 6 x 256 = 2816).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# SDXL refiner 1.0 (stabilityai/stable-diffusion-xl-refiner-1.0, unet/config.json): four blocks of
# (384, 768, 1536, 1536), attention in the middle two with 4 transformer layers each, cross-
# attention over text_encoder_2 alone (1280), and an added embedding of the pooled projection plus
# five ids (original size 2, crop 2, aesthetic score 1: 1280 + 5 x 256 = 2560).
# NOT SURE: attention_head_dim (6, 12, 24, 24) is recalled as "heads of 64 channels", as in the
# base; it is not read from the file here (it does not change the FLOPs: only how they are split).
SDXL_REFINER_UNET = dict(
    SDXL_UNET,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=(
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
)
# SDXL's VAE (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json): SD2's architecture at
# sample_size 1024 with its own scaling factor; force_upcast true (it overflows in float16).
SDXL_VAE = dict(SD2_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# text_encoder: OpenAI CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14).
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
}
# text_encoder_2: OpenCLIP ViT-bigG/14's text tower (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k),
# with its 1280 projection (CLIPTextModelWithProjection: the pooled embedding).
CLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": 49408,
}
SD2_TEXT_FULL = dict(SD2_TEXT, vocab_size=49408)
REPO = Path(__file__).resolve().parents[1]

TOKENS = 77
TEXT_BATCH = 2  # the prompt and the negative prompt


@dataclass(frozen=True)
class Model:
    """One family's (or its refiner's) full-size parts."""

    name: str
    family: str  # its row in sdfleet.schemas.families.FAMILIES
    refiner: bool  # the figures are the row's refiner_flops
    size: int  # the output side the figures are counted at
    unet: dict
    vae: dict
    # (config, with projection) per text encoder, in the pipeline's order
    text: tuple[tuple[dict, bool], ...]
    time_ids: int  # the "text_time" embedding's ids (0: no added embedding)


MODELS = (
    Model("sd2-base", "sd2", False, 512, SD2_UNET, SD2_VAE, ((SD2_TEXT_FULL, False),), 0),
    Model(
        "sdxl-base",
        "sdxl",
        False,
        1024,
        SDXL_UNET,
        SDXL_VAE,
        ((CLIP_L, False), (CLIP_BIG_G, True)),
        6,
    ),
    Model(
        "sdxl-refiner",
        "sdxl",
        True,
        1024,
        SDXL_REFINER_UNET,
        SDXL_VAE,
        ((CLIP_BIG_G, True),),
        5,
    ),
)


def _tflop(run) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return counter.get_total_flops() / 1e12


def unet_tflop(model: Model) -> float:
    """One UNet forward, batch 1, at `model.size` output pixels."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        unet = UNet2DConditionModel(**model.unet)
        unet.set_attn_processor(AttnProcessor())
        side = model.size // 8
        sample = torch.empty(1, 4, side, side)
        hidden = torch.empty(1, TOKENS, model.unet["cross_attention_dim"])
        added = None
        if model.time_ids:
            pooled = model.unet["projection_class_embeddings_input_dim"] - 256 * model.time_ids
            added = {
                "text_embeds": torch.empty(1, pooled),
                "time_ids": torch.empty(1, model.time_ids),
            }
        timestep = torch.tensor(999)
    return _tflop(lambda: unet(sample, timestep, hidden, added_cond_kwargs=added))


def vae_decode_tflop(model: Model) -> float:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        vae = AutoencoderKL(**model.vae)
        vae.set_attn_processor(AttnProcessor())
        side = model.size // 8
        latents = torch.empty(1, 4, side, side)
    return _tflop(lambda: vae.decode(latents))


def text_tflop(model: Model) -> float:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0.0
    for config, projection in model.text:
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        with torch.device("meta"):
            encoder = cls(CLIPTextConfig(**config, attn_implementation="eager"))
            ids = torch.zeros(TEXT_BATCH, TOKENS, dtype=torch.long)
        # SDXL reads the penultimate hidden states: every layer runs.
        total += _tflop(lambda e=encoder, i=ids: e(i, output_hidden_states=True))
    return total


@dataclass(frozen=True)
class Count:
    model: Model
    unet: float
    vae_decode: float
    text: float


def count(model: Model) -> Count:
    return Count(model, unet_tflop(model), vae_decode_tflop(model), text_tflop(model))


def stated(model: Model):
    """The family table's figures for this model."""
    from sdfleet.schemas.families import FAMILIES

    family = FAMILIES[model.family]
    return family.refiner_flops if model.refiner else family.flops


def matches(counted: float, figure: float) -> bool:
    """The table's figures are rounded (SD2's UNet figure is CFG's 1.609 halved): a count matches
    within half a unit of the figure's last digit, or within 0.05% of it."""
    digits = len(repr(figure).split(".")[1]) if "." in repr(figure) else 0
    return abs(counted - figure) <= max(0.5 * 10**-digits, 5e-4 * figure) + 1e-12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 where a count differs from the table"
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the transformer families' counts to schemas/family_flops.py",
    )
    args = parser.parse_args(argv)
    # Here, not at the top: flops_dit reads this module's configs.
    from flops_dit import DIT_MODELS, count_dit, dit_mismatches, write_module

    counts = [count(model) for model in MODELS]
    shared: dict = {}
    dit = [count_dit(model, shared) for model in DIT_MODELS]
    if args.write:
        write_module(dit, REPO / "schemas" / "family_flops.py")
    print(
        f"{'model':14} {'size':>5} {'unet x1':>9} {'unet CFG':>9} {'vae dec':>9} {'text':>8}"
        "   (TFLOP per image)"
    )
    for c in counts:
        print(
            f"{c.model.name:14} {c.model.size:>5} {c.unet:9.4f} {2 * c.unet:9.4f} "
            f"{c.vae_decode:9.4f} {c.text:8.4f}"
        )
    print_dit(dit)
    wrong = [line for c in counts for line in mismatches(c)]
    wrong += [line for c in dit for line in dit_mismatches(c)]
    for line in wrong:
        print("MISMATCH", line)
    return 1 if args.check and wrong else 0


def print_dit(counts: list) -> None:
    """The transformer families: per forward and per image at the native size, default steps,
    guidance and T5 length, and the check of each polynomial at a size it was not fitted at."""
    print(
        f"\n{'model':14} {'size':>5} {'T5':>4} {'dit x1':>9} {'vae dec':>9} {'text x1':>8} "
        f"{'steps':>5} {'passes':>6} {'image':>9} {'params':>7}   (TFLOP; params: B)"
    )
    for c in counts:
        m, s = c.model, c.stated()
        print(
            f"{m.name:14} {m.size:>5} {m.sequence_length:>4} {s.denoiser_tflop:9.4f} "
            f"{s.vae_decode_tflop:9.4f} {s.text_tflop:8.4f} {m.steps:>5} {m.passes:>6} "
            f"{c.per_image():9.2f} {c.parameters / 1e9:7.3f}"
        )
    from flops_dit import CHECK_GRID

    for c in counts:
        print(
            f"{c.model.name}: at {CHECK_GRID}x{CHECK_GRID} tokens the formula gives "
            f"{c.check_formula():.4f} TFLOP, counted {c.check_counted:.4f}"
        )


def mismatches(c: Count) -> list[str]:
    """What differs between a count and the family table's figures."""
    model, wrong = c.model, []
    table = stated(model)
    if table is None:
        return [f"{model.name}: the family table has no figures"]
    if table.pixels != model.size**2:
        wrong.append(f"{model.name}: the table counts at {table.pixels} pixels")
    for part, counted, figure in (
        ("denoiser", c.unet, table.denoiser_tflop),
        ("vae decode", c.vae_decode, table.vae_decode_tflop),
        ("text", c.text, table.text_tflop),
    ):
        if not matches(counted, figure):
            wrong.append(f"{model.name} {part}: counted {counted:.4f}, the table says {figure}")
    return wrong


if __name__ == "__main__":
    sys.exit(main())
