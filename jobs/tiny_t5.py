"""A tiny T5 tokenizer and encoder made offline (no hub), shared by the T5 families' tiny
pipelines (SD3.5's text_encoder_3, FLUX.1's text_encoder_2).

The tokenizer is a small Unigram model trained here with the `tokenizers` library and wrapped as a
`T5TokenizerFast`, so `save_pretrained` / `from_pretrained` round-trip it like the real one: it
pads with `<pad>`, ends with `</s>` and truncates at the pipeline's `max_sequence_length`.
"""

from __future__ import annotations

T5_VOCAB = 200
T5_HIDDEN = 32  # d_model: the width the tiny denoisers' joint attention reads

# Enough words that the Unigram model learns pieces for the prompts tests write; any other text
# still tokenizes (the Metaspace pre-tokenizer and <unk> cover it).
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
    """A T5TokenizerFast over a Unigram vocabulary of T5_VOCAB pieces, trained in a few seconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
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
