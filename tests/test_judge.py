"""The judge (actors/judge.py), the one place a sample's status is decided, and best-of-N's
selection (actors/selection.py), which asks it: pure functions, tested without a model."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from sdfleet.actors.curation import CurationScores
from sdfleet.actors.judge import Evidence, Judge, Outcome, Verdict
from sdfleet.actors.safety import SafetyScore
from sdfleet.actors.selection import BestOfN
from sdfleet.schemas.samples import Sample
from sdfleet.schemas.spec import parse_spec

GATES = {"min_clip_score": 20.0, "min_aesthetic": 5.0, "max_punsafe": 0.1}


def safety(nsfw: float) -> SafetyScore:
    return SafetyScore(nsfw, {"porn": nsfw, "neutral": 1 - nsfw})


def curation(clip=30.0, aesthetic=6.0, punsafe=0.05, embedding=None) -> CurationScores:
    return CurationScores(clip, aesthetic, punsafe, embedding)


def verdict(action="drop", gates=None, **evidence) -> Verdict:
    return Judge(0.5, action, gates or {}).verdict(Evidence(**evidence))


# ---------------------------------------------------------------------------- not made


def test_a_sample_that_could_not_be_made_fails_with_its_reason_whatever_else_is_known():
    v = verdict(error="prompt is null", made=False)
    assert (v.status, v.error, v.keeps_image) == ("failed", "prompt is null", False)
    # The pipeline's reason, even with scores at hand, still fails it.
    v = verdict(error="input too large", safety=safety(0.9), curation=curation(clip=0))
    assert (v.status, v.error, v.flagged) == ("failed", "input too large", None)


def test_a_candidate_slot_never_made_without_an_error_is_skipped():
    v = verdict(made=False)
    assert (v.status, v.error, v.keeps_image) == ("skipped", None, False)


# ---------------------------------------------------------------------------- safety actions


def test_without_a_detector_nothing_is_flagged():
    v = verdict()
    assert (v.status, v.flagged, v.blackout, v.quarantined) == ("ok", None, False, False)
    assert v.keeps_image


def test_the_threshold_itself_flags_and_below_it_does_not():
    assert verdict(safety=safety(0.5)).flagged is True
    assert verdict(safety=safety(0.5)).status == "filtered"
    below = verdict(safety=safety(0.4999))
    assert (below.status, below.flagged) == ("ok", False)


def test_drop_filters_a_flagged_image_and_keeps_no_image():
    v = verdict("drop", safety=safety(0.9))
    assert (v.status, v.flagged, v.quarantined, v.blackout) == ("filtered", True, False, False)
    assert not v.keeps_image


def test_quarantine_filters_a_flagged_image_and_keeps_it_for_the_quarantine_tar():
    v = verdict("quarantine", safety=safety(0.9))
    assert (v.status, v.flagged, v.quarantined) == ("filtered", True, True)
    assert v.keeps_image


def test_blackout_keeps_a_flagged_image_ok_but_black():
    v = verdict("blackout", safety=safety(0.9))
    assert (v.status, v.flagged, v.blackout, v.quarantined) == ("ok", True, True, False)
    assert v.keeps_image
    assert verdict("blackout", safety=safety(0.1)).blackout is False


def test_score_only_marks_a_flagged_image():
    v = verdict("score", safety=safety(0.9))
    assert (v.status, v.flagged, v.blackout, v.quarantined) == ("ok", True, False, False)


# ---------------------------------------------------------------------------- curation gates


@pytest.mark.parametrize(
    "gate, scores",
    [
        ("min_clip_score", {"clip": 19.9}),
        ("min_aesthetic", {"aesthetic": 4.9}),
        ("max_punsafe", {"punsafe": 0.11}),
    ],
)
def test_each_gate_rejects_what_fails_it(gate, scores):
    v = verdict(gates=GATES, curation=curation(**scores))
    assert (v.status, v.rejected_by, v.keeps_image) == ("rejected", gate, False)


def test_the_gates_bounds_themselves_pass():
    v = verdict(gates=GATES, curation=curation(clip=20.0, aesthetic=5.0, punsafe=0.1))
    assert (v.status, v.rejected_by) == ("ok", None)


def test_an_image_failing_two_gates_names_both_in_gate_order():
    v = verdict(gates=GATES, curation=curation(clip=1.0, punsafe=0.9))
    assert v.rejected_by == "min_clip_score,max_punsafe"


def test_without_gates_or_without_scores_nothing_is_rejected():
    assert verdict(curation=curation(clip=0.0)).status == "ok"
    assert verdict(gates=GATES).status == "ok"


def test_a_filtered_image_never_reaches_the_gates():
    v = verdict("drop", gates=GATES, safety=safety(0.9), curation=curation(clip=0.0))
    assert (v.status, v.rejected_by) == ("filtered", None)


def test_a_blacked_out_image_is_still_gated_on_its_scores():
    v = verdict("blackout", gates=GATES, safety=safety(0.9), curation=curation(clip=0.0))
    assert (v.status, v.rejected_by, v.blackout, v.keeps_image) == (
        "rejected",
        "min_clip_score",
        True,
        False,
    )


# ---------------------------------------------------------------------------- duplicates


def test_an_image_too_close_to_a_kept_one_is_a_duplicate():
    v = verdict(gates=GATES, curation=curation(), duplicate_of="000000003")
    assert (v.status, v.duplicate_of, v.keeps_image) == ("duplicate", "000000003", False)


def test_a_rejected_image_is_rejected_not_a_duplicate():
    v = verdict(gates=GATES, curation=curation(clip=0.0), duplicate_of="000000003")
    assert (v.status, v.duplicate_of) == ("rejected", None)


def test_rejudging_an_outcome_with_more_evidence_changes_its_verdict():
    judge = Judge(0.5, "score", GATES)
    o = Outcome.judged(judge, Evidence(safety=safety(0.9), curation=curation()), gen_seconds=1.0)
    assert (o.verdict.status, o.verdict.flagged) == ("ok", True)
    o.rejudge(judge, duplicate_of="000000001")
    assert (o.verdict.status, o.verdict.flagged, o.verdict.duplicate_of) == (
        "duplicate",
        True,
        "000000001",
    )
    assert o.evidence.safety.nsfw_score == 0.9 and o.gen_seconds == 1.0


def test_the_judge_reads_the_specs_threshold_action_and_gates():
    spec = parse_spec(
        {
            "model": {"source": "m"},
            "input": {"uri": "in/"},
            "output": {"uri": "out/"},
            "safety": {"detector": "none", "threshold": 0.3, "action": "blackout"},
            "curation": {"clip_model": "c", "min_clip_score": 21.0},
        }
    )
    assert Judge.of(spec) == Judge(0.3, "blackout", {"min_clip_score": 21.0})


def test_only_the_judge_makes_verdicts():
    """A status decided anywhere else would be a second place to keep in step with this one."""
    actors = Path(__file__).resolve().parents[1] / "actors"
    makers = set()
    for path in actors.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Verdict"
            ):
                makers.add(path.name)
    assert makers == {"judge.py"}


# ---------------------------------------------------------------------------- best-of-N


def candidates(groups: int, slots: int) -> list[Sample]:
    return [
        Sample(f"{g * slots + c:09d}", 0, f"p{g}", None, group=g, candidate=c)
        for g in range(groups)
        for c in range(slots)
    ]


def unit(*v) -> np.ndarray:
    e = np.array(v, dtype=np.float32)
    return e / np.linalg.norm(e)


def test_best_of_n_tries_k_slots_then_only_what_each_prompt_lacks():
    judge = Judge(0.5, "drop", {"min_clip_score": 20.0})
    todo = candidates(groups=2, slots=4)
    selection = BestOfN(todo, images_per_prompt=2, dedup_threshold=None)
    clip = {"000000000": 30, "000000001": 10, "000000002": 30, "000000004": 30, "000000005": 30}
    outcomes = {}
    rounds = []
    while round_ := selection.next_round():
        rounds.append([s.key for s in round_])
        for s in round_:
            outcomes[s.key] = Outcome.judged(judge, Evidence(curation=curation(clip=clip[s.key])))
        selection.keep(round_, outcomes, judge)
    # Round 1: each prompt's first two slots; prompt 0 lost slot 1 to the gate, so round 2 tries
    # its slot 2 alone; prompt 1 is done; slot 3 of prompt 0 is never tried.
    assert rounds == [["000000000", "000000001", "000000004", "000000005"], ["000000002"]]
    assert [k for k, _ in selection.kept[0]] == ["000000000", "000000002"]
    assert {k: o.verdict.status for k, o in outcomes.items()} == {
        "000000000": "ok",
        "000000001": "rejected",
        "000000002": "ok",
        "000000004": "ok",
        "000000005": "ok",
    }


def test_best_of_n_judges_an_image_too_close_to_a_kept_one_a_duplicate():
    judge = Judge(0.5, "drop")
    todo = candidates(groups=1, slots=3)
    selection = BestOfN(todo, images_per_prompt=2, dedup_threshold=0.9)
    embeddings = {"000000000": unit(1, 0), "000000001": unit(1, 0.1), "000000002": unit(0, 1)}
    outcomes = {}
    while round_ := selection.next_round():
        for s in round_:
            outcomes[s.key] = Outcome.judged(
                judge, Evidence(curation=curation(embedding=embeddings[s.key]))
            )
        selection.keep(round_, outcomes, judge)
    assert {k: (o.verdict.status, o.verdict.duplicate_of) for k, o in outcomes.items()} == {
        "000000000": ("ok", None),
        "000000001": ("duplicate", "000000000"),
        "000000002": ("ok", None),
    }


def test_best_of_n_passes_over_a_slot_the_pipeline_could_not_make():
    judge = Judge(0.5, "drop")
    todo = candidates(groups=1, slots=3)
    selection = BestOfN(todo, images_per_prompt=1, dedup_threshold=None)
    first = selection.next_round()
    selection.keep(first, {}, judge)  # no outcome: the pipeline failed it
    second = selection.next_round()
    assert [s.key for s in first] == ["000000000"] and [s.key for s in second] == ["000000001"]
