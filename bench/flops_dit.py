"""FLOPs of the transformer families (SD3.5 Medium and Large, FLUX.1 dev, schnell and Fill), counted on
meta tensors: what `schemas/family_flops.py` states. bench/flops.py prints and checks them.

A transformer's cost is not linear in pixels: attention is quadratic in its tokens, and its
sequence holds the prompt's text tokens too (SD3.5: CLIP's 77 + T5's max_sequence_length; FLUX.1:
T5's alone). So each denoiser is counted at five (image tokens, text tokens) points and solved for
the exact polynomial its FLOPs are (`TokenCost`: a constant, a term per image token, one per text
token, one per pair of tokens in the joint sequence, one per pair of image tokens for SD3.5
Medium's image-only attention). The T5 encoder is counted at two lengths likewise (a term per token
and one per pair), and the VAE decoder at three latent sizes (its mid-block attention is quadratic
in latent pixels). A count at a size none of the fits used checks each formula.

Configs, as published on the hub (the repos are gated; the values were read from copies of these
files in public code and agree with diffusers' docs):
- stabilityai/stable-diffusion-3.5-medium transformer/config.json, -large transformer/config.json,
  vae/config.json; text_encoder (CLIP ViT-L with projection), text_encoder_2 (OpenCLIP bigG with
  projection), text_encoder_3 (google/t5-v1_1-xxl's encoder).
- black-forest-labs/FLUX.1-dev and FLUX.1-schnell transformer/config.json (they differ only in
  guidance_embeds), vae/config.json (SD3's architecture, its own scaling and shift), text_encoder
  (CLIP ViT-L, no projection), text_encoder_2 (T5-XXL's encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from flops import CLIP_BIG_G, CLIP_L, SD2_VAE
from sdfleet.schemas.flops import Flops, TokenCost, TokenFlops

SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),  # layers 0-12 add an image-only attention
    "qk_norm": "rms_norm",
}
SD35_LARGE = dict(
    SD35_MEDIUM,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    pos_embed_max_size=192,
    dual_attention_layers=[],
)
FLUX1_DEV = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x a 2x2 patch, packed by the pipeline
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX1_SCHNELL = dict(FLUX1_DEV, guidance_embeds=False)
# black-forest-labs/FLUX.1-Fill-dev's transformer/config.json: dev's, but its x_embedder reads the
# noisy latents, the masked image's latents and the packed mask (64 + 64 + 256 channels).
FLUX1_FILL = dict(FLUX1_DEV, in_channels=384, out_channels=64)
# SD3's VAE (and FLUX.1's, with scaling_factor 0.3611, shift_factor 0.1159): SD2's architecture
# with 16 latent channels and no quant convs.
SD3_VAE = dict(
    SD2_VAE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# google/t5-v1_1-xxl's encoder (T5EncoderModel): 24 layers, gated-GELU feed-forward.
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}

CLIP_TOKENS = 77
LATENT_CHANNELS = 16
VAE_SCALE = 8  # output pixels per latent pixel
PATCH = 2  # latent pixels per image token, each way (SD3's patch_size, FLUX's packing)


@dataclass(frozen=True)
class DitModel:
    """One variant's full-size parts."""

    name: str
    constant: str  # its Flops in schemas/family_flops.py
    kind: str  # "sd3" or "flux"
    transformer: dict
    vae: dict
    clip: tuple[tuple[dict, bool], ...]  # (config, with projection), in the pipeline's order
    size: int  # the native output side
    sequence_length: int  # T5 tokens by default (the pipelines' max_sequence_length)
    steps: int  # the default steps the report states an image's cost at
    guidance: float  # ... and guidance scale (SD3.5: CFG; FLUX.1-dev: the embedded guidance)

    @property
    def clip_tokens(self) -> int:
        """Text tokens in the joint sequence besides T5's: SD3.5 joins its CLIP encoders' hidden
        states channel-wise into 77 tokens ahead of T5's; FLUX.1 reads CLIP's pooled output only."""
        return CLIP_TOKENS if self.kind == "sd3" else 0

    @property
    def passes(self) -> int:
        return 2 if self.kind == "sd3" and self.guidance > 1 else 1


SD3_CLIP = ((CLIP_L, True), (CLIP_BIG_G, True))  # both with their projections
DIT_MODELS = (
    DitModel(
        "sd3.5-medium",
        "SD35_MEDIUM_FLOPS",
        "sd3",
        SD35_MEDIUM,
        SD3_VAE,
        SD3_CLIP,
        1024,
        256,
        40,
        4.5,
    ),
    DitModel(
        "sd3.5-large", "SD35_LARGE_FLOPS", "sd3", SD35_LARGE, SD3_VAE, SD3_CLIP, 1024, 256, 28, 3.5
    ),
    DitModel(
        "flux1-dev",
        "FLUX1_DEV_FLOPS",
        "flux",
        FLUX1_DEV,
        FLUX_VAE,
        ((CLIP_L, False),),
        1024,
        512,
        50,
        3.5,
    ),
    DitModel(
        "flux1-schnell",
        "FLUX1_SCHNELL_FLOPS",
        "flux",
        FLUX1_SCHNELL,
        FLUX_VAE,
        ((CLIP_L, False),),
        1024,
        256,
        4,
        0.0,
    ),
    # FluxFillPipeline's defaults: 50 steps at guidance 30, 512 T5 tokens.
    DitModel(
        "flux1-fill",
        "FLUX1_FILL_FLOPS",
        "flux",
        FLUX1_FILL,
        FLUX_VAE,
        ((CLIP_L, False),),
        1024,
        512,
        50,
        30.0,
    ),
)


def _flops(run) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return counter.get_total_flops()


def build_transformer(model: DitModel):
    """The full-size transformer on the current default device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if model.kind == "sd3" else FluxTransformer2DModel
    return cls(**model.transformer)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_flops(model: DitModel, transformer, grid: int, text_tokens: int) -> int:
    """One forward for one image of grid x grid image tokens (a side of grid x PATCH x VAE_SCALE
    pixels) and `text_tokens` text tokens."""
    import torch

    config = model.transformer
    with torch.device("meta"):
        text = torch.empty(1, text_tokens, config["joint_attention_dim"])
        pooled = torch.empty(1, config["pooled_projection_dim"])
        timestep = torch.tensor([999.0])
        if model.kind == "sd3":
            latent = torch.empty(1, LATENT_CHANNELS, grid * PATCH, grid * PATCH)
            return _flops(lambda: transformer(latent, text, pooled, timestep))
        image = torch.empty(1, grid * grid, config["in_channels"])
        img_ids, txt_ids = torch.zeros(grid * grid, 3), torch.zeros(text_tokens, 3)
        guidance = torch.tensor([3.5]) if config["guidance_embeds"] else None
    return _flops(
        lambda: transformer(
            image, text, pooled, timestep, img_ids, txt_ids, guidance, return_dict=False
        )
    )


def vae_decode_flops(vae_config: dict, latent_side: int) -> int:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
        vae.set_attn_processor(AttnProcessor())
        latents = torch.empty(1, LATENT_CHANNELS, latent_side, latent_side)
    return _flops(lambda: vae.decode(latents))


def clip_flops(clip: tuple[tuple[dict, bool], ...]) -> int:
    """The CLIP encoders over one prompt of 77 tokens (every layer: SD3.5 reads the penultimate
    hidden states, FLUX.1 the pooled output)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for config, projection in clip:
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        with torch.device("meta"):
            encoder = cls(CLIPTextConfig(**config, attn_implementation="eager"))
            ids = torch.zeros(1, CLIP_TOKENS, dtype=torch.long)
        total += _flops(lambda e=encoder, i=ids: e(i, output_hidden_states=True))
    return total


def t5_flops(encoder, length: int) -> int:
    import torch

    with torch.device("meta"):
        ids = torch.zeros(1, length, dtype=torch.long)
    return _flops(lambda: encoder(ids))


def build_t5():
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return T5EncoderModel(T5Config(**T5_XXL, attn_implementation="eager"))


def solve(rows: list[list[int]], values: list[int]) -> list[float]:
    """The exact solution of a small integer linear system (Gauss-Jordan over fractions: the
    coefficients span twelve orders of magnitude, where floats would lose the small ones)."""
    from fractions import Fraction

    m = [[Fraction(x) for x in row] + [Fraction(v)] for row, v in zip(rows, values)]
    n = len(m)
    for col in range(n):
        pivot = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[pivot] = m[pivot], m[col]
        m[col] = [x / m[col][col] for x in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                m[r] = [a - m[r][col] * b for a, b in zip(m[r], m[col])]
    return [float(row[-1]) for row in m]


# The (image-token grid, text tokens beyond the default) points each transformer is counted at:
# three sizes at the default text length and two at a longer one fix the five terms.
FIT_POINTS = ((32, 0), (48, 0), (64, 0), (32, 128), (64, 128))


def fit_transformer(model: DitModel, transformer) -> TokenCost:
    """The denoiser's TokenCost, in TFLOP, from counts at FIT_POINTS."""
    text0 = model.clip_tokens + model.sequence_length
    rows, values = [], []
    for grid, extra in FIT_POINTS:
        n, t = grid * grid, text0 + extra
        rows.append(
            [1, n, t, (n + t) ** 2, n * n if model.transformer.get("dual_attention_layers") else 0]
        )
        values.append(transformer_flops(model, transformer, grid, t))
    if not model.transformer.get("dual_attention_layers"):  # no image-only attention: 4 terms
        rows = [row[:4] for row in rows[:4]]
        values = values[:4]
    terms = [x / 1e12 for x in solve(rows, values)] + [0.0]
    return TokenCost(*terms[:5])


def fit_t5(encoder) -> TokenCost:
    """T5's cost per prompt by its length: a term per token and one per pair (its attention)."""
    lengths = (128, 256)
    values = [t5_flops(encoder, length) for length in lengths]
    per_token, per_pair = solve([[n, n * n] for n in lengths], values)
    return TokenCost(text=per_token / 1e12, joint_pairs=per_pair / 1e12)


def fit_vae(vae_config: dict) -> TokenCost:
    """The VAE decode's cost by latent pixels n (`image`: per latent pixel, `image_pairs`: its
    mid-block attention)."""
    sides = (32, 64, 128)
    values = [vae_decode_flops(vae_config, side) for side in sides]
    c, per_pixel, per_pair = solve([[1, s * s, s**4] for s in sides], values)
    return TokenCost(constant=c / 1e12, image=per_pixel / 1e12, image_pairs=per_pair / 1e12)


@dataclass(frozen=True)
class DitCount:
    """One variant's counts: the fitted polynomials, a direct count at a size the fits did not
    use (CHECK_GRID) to test them by, and the transformer's parameters."""

    model: DitModel
    tokens: TokenFlops
    check_counted: float  # TFLOP of one transformer forward at CHECK_GRID, counted
    parameters: int

    def stated(self) -> Flops:
        """The Flops schemas/family_flops.py states: the polynomials' figures at the native
        size and default T5 length, rounded as the table prints them."""
        pixels, length = self.model.size**2, self.model.sequence_length
        return Flops(
            pixels=pixels,
            denoiser_tflop=round(self.tokens.denoiser_tflop(pixels, length), 4),
            vae_decode_tflop=round(self.tokens.vae_decode_tflop(pixels), 4),
            text_tflop=round(self.tokens.text_tflop(length), 4),
            tokens=self.tokens,
        )

    def check_formula(self) -> float:
        """The denoiser polynomial at CHECK_GRID and the default text length."""
        t = self.model.clip_tokens + self.model.sequence_length
        return self.tokens.denoiser.tflop(CHECK_GRID**2, t)

    def per_image(self) -> float:
        """TFLOP of one image at the native size, default steps, guidance and T5 length."""
        m = self.model
        return self.stated().tflop_per_image(m.size, m.size, m.steps, m.passes)


# 1536 x 1536 pixels (96 x 96 image tokens): no fit used it.
CHECK_GRID = 96


def count_dit(model: DitModel, shared: dict) -> DitCount:
    """shared: the encoders' and VAEs' fits by config, which variants have in common."""
    import torch

    with torch.device("meta"):
        transformer = build_transformer(model)
    denoiser = fit_transformer(model, transformer)
    t = model.clip_tokens + model.sequence_length
    check = transformer_flops(model, transformer, CHECK_GRID, t) / 1e12
    if "t5" not in shared:
        shared["t5"] = fit_t5(build_t5())
    vae_key, clip_key = repr(model.vae), repr(model.clip)
    if vae_key not in shared:
        shared[vae_key] = fit_vae(model.vae)
    if clip_key not in shared:
        shared[clip_key] = clip_flops(model.clip) / 1e12
    tokens = TokenFlops(
        denoiser=denoiser,
        vae_decode=shared[vae_key],
        sequence_encoder=shared["t5"],
        clip_tflop=shared[clip_key],
        clip_tokens=model.clip_tokens,
        sequence_length=model.sequence_length,
    )
    return DitCount(model, tokens, check, parameters(transformer))


def dit_mismatches(c: DitCount) -> list[str]:
    """What differs between a count and schemas/family_flops.py, and whether the polynomial
    meets a direct count at a size it was not fitted at (within 1%)."""
    from sdfleet.schemas import family_flops

    name, wrong = c.model.name, []
    if abs(c.check_formula() - c.check_counted) > 0.01 * c.check_counted:
        wrong.append(
            f"{name}: the formula gives {c.check_formula():.4f} at {CHECK_GRID}^2 tokens, "
            f"counted {c.check_counted:.4f}"
        )
    table = getattr(family_flops, c.model.constant, None)
    if table != c.stated():
        wrong.append(f"{name}: schemas/family_flops.py {c.model.constant} is not the count")
    return wrong


# Token costs that are the same part in every variant (SD3.5's and FLUX.1's 16-channel VAE, T5-XXL),
# named once in the module when every count agrees.
SHARED_PARTS = {"vae_decode": "VAE_DECODE", "sequence_encoder": "T5_XXL_ENCODER"}


def render(counts: list[DitCount]) -> str:
    """schemas/family_flops.py's constants, as `bench/flops.py --write` writes them."""
    shared = {}
    for part, name in SHARED_PARTS.items():
        values = {repr(getattr(c.tokens, part)) for c in counts}
        if len(values) == 1:
            shared[part] = name
    lines = [f"{name} = {getattr(counts[0].tokens, part)!r}" for part, name in shared.items()]
    lines += [""] if shared else []
    for c in counts:
        m, s, t = c.model, c.stated(), c.tokens
        parts = {
            p: shared.get(p) or repr(getattr(t, p)) for p in ("vae_decode", "sequence_encoder")
        }
        lines += [
            f"# {m.name}: {c.parameters / 1e9:.3f}B transformer parameters. At {m.size}x{m.size}"
            f" and T5 {m.sequence_length} tokens:",
            f"# {s.denoiser_tflop} TFLOP per transformer forward, {c.per_image():.1f} per image"
            f" at {m.steps} steps x {m.passes} pass(es).",
            f"{m.constant} = Flops(",
            f"    pixels={m.size} * {m.size},",
            f"    denoiser_tflop={s.denoiser_tflop},",
            f"    vae_decode_tflop={s.vae_decode_tflop},",
            f"    text_tflop={s.text_tflop},",
            "    tokens=TokenFlops(",
            f"        denoiser={t.denoiser!r},",
            f"        vae_decode={parts['vae_decode']},",
            f"        sequence_encoder={parts['sequence_encoder']},",
            f"        clip_tflop={t.clip_tflop!r},",
            f"        clip_tokens={t.clip_tokens},",
            f"        sequence_length={t.sequence_length},",
            "    ),",
            ")",
            "",
        ]
    return "\n".join(lines)


MODULE_HEADER = '''"""FLOPs of the transformer families' variants (SD3.5 Medium and Large, FLUX.1 dev,
schnell and Fill), counted on meta tensors at each variant's native size and default T5 length by
bench/flops_dit.py, which also fits each part's polynomial in its tokens (`TokenFlops`).

Written by `python bench/flops.py --write` (then `ruff format`); `python bench/flops.py --check`
recounts and exits 1 where this file differs. The family rows' variants state these as their
`flops`.
"""

from sdfleet.schemas.flops import Flops, TokenCost, TokenFlops

'''


def write_module(counts: list[DitCount], path) -> None:
    path.write_text(MODULE_HEADER + render(counts))
