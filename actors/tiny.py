"""A tiny, random-weight Stable Diffusion 2-base pipeline written to disk.

No model hub is reachable from CI or the demo box, yet the workers must be
exercised through the real ``from_pretrained`` path (safetensors, configs,
tokenizer files). This writes a few-MB pipeline with the SD2-base architecture
so those code paths run offline and fast on CPU.
"""

from __future__ import annotations

import os
import pathlib

_MAX_LEN = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# Enough merges that common words are not all single bytes; quality is irrelevant.
_MERGES = ["t h", "th e</w>", "a n", "i n", "o n", "e r", "a t", "r e", "c a", "ca t</w>"]


def _byte_symbols() -> list[str]:
    # GPT-2's bytes_to_unicode: every byte maps to a printable symbol, so no
    # input character can fall outside the vocabulary.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tokenizer():
    from transformers import CLIPTokenizer

    base = _byte_symbols()
    # CLIP's BPE marks word ends with "</w>"; without the "</w>" variants of
    # every byte, any word-final character not covered by a merge is unknown.
    tokens = base + [s + "</w>" for s in base] + [m.replace(" ", "") for m in _MERGES]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + [_BOS, _EOS]))}
    # transformers 5 builds the `tokenizers` backend from in-memory vocab and
    # merges; the old vocab_file=/merges_file= kwargs are silently ignored and
    # leave a 3-token vocabulary behind.
    return CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in _MERGES],
        pad_token=_EOS, model_max_length=_MAX_LEN,
    )


def write_tiny_pipeline(path: str | os.PathLike) -> pathlib.Path:
    """Write the tiny pipeline to ``path`` (safetensors) and return it.

    Seeding before each component keeps the weights byte-identical across runs,
    so cached fixtures and checksums stay valid.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer()
    hidden = 32

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4),  # per-block tuple, as in SD2
        use_linear_projection=True,  # SD2's transformer blocks use linear proj_in/out
        norm_num_groups=32,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(
        # Four blocks -> three downsamples -> scale factor 8, as in SD, so
        # 64x64 images map to the UNet's 8x8 latents.
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        in_channels=3, out_channels=3, latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=64,
    )

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=hidden, hidden_act="gelu",
        vocab_size=len(tokenizer), max_position_embeddings=_MAX_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))

    # SD2-base's shipped scheduler config (its model card swaps in Euler at
    # run time; the repo itself holds PNDM/PLMS). Built via from_config because
    # SD's config carries clip_sample, which PNDM's constructor does not accept.
    scheduler = PNDMScheduler.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    ))

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = pathlib.Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
