"""The safety detector table (sdfleet.schemas.detectors): one row per safety.detector, its
defaults, and the nsfw_score formulas, written once."""

from __future__ import annotations

import pytest

from sdfleet.schemas.detectors import (
    DETECTORS,
    NO_DETECTOR,
    margin_score,
    needs_clip_model_error,
    summed_score,
)
from sdfleet.schemas.spec import SafetySpec, parse_spec

BASE = {"input": {"uri": "s3://b/p/"}, "output": {"uri": "s3://b/o/"}}


def test_every_spec_detector_has_a_row_and_the_rows_their_defaults():
    assert set(DETECTORS) == set(SafetySpec.model_fields["detector"].annotation.__args__)
    assert DETECTORS["nsfw-detector"].unsafe_classes == ("porn", "hentai", "sexy")
    assert DETECTORS["nsfw-detector"].classes == ("drawings", "hentai", "neutral", "porn", "sexy")
    assert DETECTORS["hf-classifier"].unsafe_classes == ("nsfw",)
    assert DETECTORS["laion-clip-nsfw"].unsafe_classes == ("unsafe",)
    assert DETECTORS["clip-checker"].unsafe_classes is None
    assert DETECTORS[NO_DETECTOR].cls is None
    # A row's unsafe classes are within the classes it outputs, where those are fixed.
    for row in DETECTORS.values():
        if row.classes and row.unsafe_classes:
            assert set(row.unsafe_classes) <= set(row.classes)


def test_the_spec_resolves_unsafe_classes_from_the_table():
    assert SafetySpec().resolved_unsafe_classes() == ["porn", "hentai", "sexy"]
    assert SafetySpec(detector="clip-checker").resolved_unsafe_classes() is None
    assert SafetySpec(unsafe_classes=["porn"]).resolved_unsafe_classes() == ["porn"]


def test_the_detector_classes_named_exist_in_actors_safety():
    safety = pytest.importorskip("sdfleet.actors.safety")
    for name, row in DETECTORS.items():
        if row.cls is not None:
            assert safety.DETECTOR_CLASSES[row.cls].name == name


def test_summed_score_adds_the_unsafe_classes_up_to_one():
    scores = {"porn": 0.5, "hentai": 0.25, "sexy": 0.5, "neutral": 0.1}
    assert summed_score(scores, ["porn", "hentai"]) == 0.75
    assert summed_score(scores, ["porn", "sexy", "hentai"]) == 1.0
    assert summed_score(scores, None) == 0
    p = 0.3
    assert summed_score({"unsafe": p, "safe": 1.0 - p}, ["unsafe"]) == p


def test_margin_score_puts_the_checkers_boundary_at_one_half():
    scores = {"concept_00": -0.2, "concept_01": 0.1}
    assert margin_score(scores, None) == 0.5 + 0.1
    assert margin_score(scores, ["concept_00"]) == 0.5 - 0.2
    assert margin_score({"c": 0.9}, None) == 1.0 and margin_score({"c": -0.9}, None) == 0.0


def test_laion_needs_clip_model_once():
    assert DETECTORS["laion-clip-nsfw"].needs_clip_model
    assert not any(r.needs_clip_model for n, r in DETECTORS.items() if n != "laion-clip-nsfw")
    with pytest.raises(ValueError, match="reads the CLIP image embedding"):
        parse_spec({**BASE, "safety": {"detector": "laion-clip-nsfw", "model": "h.safetensors"}})
    assert "curation.clip_model" in needs_clip_model_error("laion-clip-nsfw")


def test_missing_weights_say_what_the_detector_takes():
    with pytest.raises(ValueError, match=r"a Keras \.h5 file or SavedModel folder"):
        SafetySpec().check_runnable()
    with pytest.raises(ValueError, match="hub id of its weights"):
        SafetySpec(detector="hf-classifier").check_runnable()
    SafetySpec(detector=NO_DETECTOR).check_runnable()
