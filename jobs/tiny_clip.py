"""The tiny CLIP tokenizer and text encoder every family's tiny pipeline uses (SD2's, SDXL's
two, SD3.5's two, FLUX.1's), made offline: a byte-level BPE vocabulary with a few merges, and a
two-layer encoder over it, saved and loaded through transformers' own code.
"""

from __future__ import annotations

from sdfleet.schemas.families import CLIP_TOKENS

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


def clip_tokenizer():
    """A CLIP BPE tokenizer made locally (no hub): byte-level symbols and a few merges, 77 tokens."""
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
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in _MERGES],
        pad_token=_EOS,
        model_max_length=CLIP_TOKENS,
    )


def clip_text_encoder(tokenizer, hidden: int, projection: bool = False):
    """A two-layer CLIP text encoder of width `hidden` over `clip_tokenizer()`'s vocabulary, every
    family's tiny one; projection: a CLIPTextModelWithProjection (SDXL's and SD3.5's pooled,
    projected encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=hidden,
        hidden_act="gelu",
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
