"""The tiny T5 tokenizer and encoder the T5 families' tiny pipelines share: made offline, saved
and loaded through transformers' own code, and truncating where the pipelines ask."""

from sdfleet.jobs.tiny_t5 import T5_HIDDEN, t5_encoder, t5_tokenizer


def test_t5_tokenizer_round_trips_and_truncates(tmp_path):
    from transformers import T5TokenizerFast

    t5_tokenizer().save_pretrained(tmp_path)
    loaded = T5TokenizerFast.from_pretrained(tmp_path)
    prompt = "a watercolor painting of a cat sitting on a red chair " * 4
    full = loaded(prompt).input_ids
    cut = loaded(prompt, max_length=8, truncation=True, padding="max_length").input_ids
    assert len(full) > 8 and full[-1] == loaded.eos_token_id
    assert len(cut) == 8 and cut[-1] == loaded.eos_token_id
    short = loaded("a cat", max_length=8, padding="max_length").input_ids
    assert short[-1] == loaded.pad_token_id


def test_t5_encoder_reads_the_tokenizers_ids():
    tokenizer = t5_tokenizer()
    ids = tokenizer("a photo of an astronaut", return_tensors="pt").input_ids
    hidden = t5_encoder()(ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], T5_HIDDEN)


def test_t5_tokenizer_is_the_same_file_in_every_process(tmp_path):
    """The tiny checkpoints' hash, and the ids prompts get, must not change from build to build."""
    import subprocess
    import sys

    def build(folder) -> bytes:
        code = f"from sdfleet.jobs.tiny_t5 import t5_tokenizer; t5_tokenizer().save_pretrained({str(folder)!r})"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return (folder / "tokenizer.json").read_bytes()

    assert build(tmp_path / "a") == build(tmp_path / "b")


def test_t5_tokenizer_keeps_corpus_words_whole_and_spells_out_the_rest():
    tokenizer = t5_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a red fox").input_ids)
    assert pieces == ["\u2581a", "\u2581red", "\u2581", "f", "o", "x", "</s>"]
    assert tokenizer.unk_token_id not in tokenizer("Zebra #42!").input_ids
