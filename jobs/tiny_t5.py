"""A tiny T5 tokenizer and encoder made offline (no hub), shared by the T5 families' tiny
pipelines (SD3.5's text_encoder_3, FLUX.1's text_encoder_2).

The tokenizer is a small Unigram model trained here with the `tokenizers` library and wrapped as a
`T5TokenizerFast`, so `save_pretrained` / `from_pretrained` round-trip it like the real one: it
pads with `<pad>`, ends with `</s>` and truncates at the pipeline's `max_sequence_length`.
"""

from __future__ import annotations

T5_VOCAB = 200
T5_HIDDEN = 32  # d_model: the width the tiny denoisers' joint attention reads

_SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
# The Metaspace pre-tokenizer's mark of a word's start, as in T5's vocabulary.
_WORD_START = "\u2581"
# The words that are one token each; any other text is the word-start mark and its characters.
_CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a cat sitting on a red chair",
    "an oil painting of a lighthouse at dusk, dramatic clouds, high detail",
    "a close up of a cup of coffee on a wooden table, morning light",
    "a futuristic city skyline at night with neon signs and rain",
    "a bowl of fruit, apples, oranges and grapes, studio lighting",
    "portrait of an old man with a beard, black and white photograph",
    "a mountain lake surrounded by pine trees in autumn",
    "blurry, low quality, watermark, text, deformed hands",
]


def t5_tokenizer():
    """A T5TokenizerFast over a Unigram vocabulary written out here: the corpus' words, then every
    printable ASCII character, so that any other text tokenizes too, piece by piece. Written, not
    trained: `tokenizers`' Unigram trainer orders pieces of near-equal score differently from run
    to run (its threads), which changed tokenizer.json, the token ids and the checkpoint's hash
    with each build."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    # Viterbi picks the highest total score: a known word (one piece) beats any split of it into
    # the word-start mark and characters.
    words = dict.fromkeys(
        f"{_WORD_START}{w}" for text in _CORPUS for w in text.replace(",", " ,").split()
    )
    characters = dict.fromkeys(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(token, 0.0) for token in _SPECIAL]
    vocab += [(word, -2.0) for word in words]
    vocab += [(_WORD_START, -3.0)] + [(c, -5.0) for c in characters if c not in words]
    assert len(vocab) <= T5_VOCAB, len(vocab)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=_SPECIAL.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


def t5_encoder(seed: int = 0):
    """A two-layer T5EncoderModel of width T5_HIDDEN over the tiny tokenizer's vocabulary."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=T5_VOCAB, d_model=T5_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4
    )
    return T5EncoderModel(config).eval()
