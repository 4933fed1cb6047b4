"""The judge: the one place a sample's status is decided.

What is known of a sample (`Evidence`: whether it was made, why not, its safety and curation
scores, the kept image it is too close to) and the spec's rules (the safety threshold and action,
the curation gates) make its `Verdict`: its status and what becomes of its image. Pure: no model,
no I/O, so every rule is tested on its own (tests/test_judge.py).

The statuses, by precedence:
- failed: it could not be made (its input, or the pipeline, said why);
- skipped: a best-of-N candidate slot that was not needed, so never made;
- filtered: flagged by the safety detector under action drop or quarantine;
- rejected: it fails a curation gate;
- duplicate: best-of-N found it too close to an image of its prompt kept before it;
- ok.
A flagged image under action blackout is blacked out and judged on as any other; under action
score it is only marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sdfleet.schemas.rows import (
    STATUS_DUPLICATE,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_SKIPPED,
)

if TYPE_CHECKING:
    from sdfleet.actors.curation import CurationScores
    from sdfleet.actors.safety import SafetyScore
    from sdfleet.schemas.spec import JobSpec


@dataclass(frozen=True)
class Evidence:
    """What is known of one sample when it is judged."""

    made: bool = True  # the pipeline made its image
    error: str | None = None  # why it could not be made (its input row, or the pipeline)
    safety: SafetyScore | None = None  # None without a detector
    curation: CurationScores | None = None  # None without curation
    duplicate_of: str | None = None  # the key of a kept image of its prompt it is too close to


@dataclass(frozen=True)
class Verdict:
    """A sample's status, and what becomes of its image."""

    status: str
    flagged: bool | None = None  # by the safety detector; None without one
    blackout: bool = False  # the image is written black
    quarantined: bool = False  # the image goes to the quarantine tar
    rejected_by: str | None = None  # the curation gates it failed, comma-separated
    duplicate_of: str | None = None
    error: str | None = None

    @property
    def keeps_image(self) -> bool:
        """The image is encoded and written: to the main tar (ok) or the quarantine tar."""
        return self.status == STATUS_OK or self.quarantined


@dataclass(frozen=True)
class Judge:
    """The spec's safety rule and curation gates."""

    threshold: float  # safety.threshold: an nsfw_score at or above it is flagged
    action: str  # safety.action: score | drop | blackout | quarantine
    gates: dict[str, float] = field(default_factory=dict)  # curation gate -> its bound

    @classmethod
    def of(cls, spec: JobSpec) -> Judge:
        return cls(spec.safety.threshold, spec.safety.action, spec.curation.gates)

    def verdict(self, evidence: Evidence) -> Verdict:
        if evidence.error is not None:
            return Verdict(STATUS_FAILED, error=evidence.error)
        if not evidence.made:
            return Verdict(STATUS_SKIPPED)
        safety, curation = evidence.safety, evidence.curation
        flagged = None if safety is None else safety.nsfw_score >= self.threshold
        if flagged and self.action in ("drop", "quarantine"):
            return Verdict(STATUS_FILTERED, flagged, quarantined=self.action == "quarantine")
        # The gates read the scores of what was generated: a blackout does not change them.
        blackout = bool(flagged) and self.action == "blackout"
        failed = curation.failed_gates(self.gates) if curation is not None else []
        if failed:
            return Verdict(STATUS_REJECTED, flagged, blackout, rejected_by=",".join(failed))
        if evidence.duplicate_of is not None:
            return Verdict(STATUS_DUPLICATE, flagged, blackout, duplicate_of=evidence.duplicate_of)
        return Verdict(STATUS_OK, flagged, blackout)


@dataclass
class Outcome:
    """What became of one planned sample: its evidence, its verdict, and its image if made."""

    evidence: Evidence
    verdict: Verdict
    gen_seconds: float | None = None  # the pipeline's time for it
    size: tuple[int, int] | None = (
        None  # (width, height) as made: the image tasks' inputs decide it
    )
    image: bytes | None = None  # encoded, for the main tar or the quarantine tar
    image_sha256: str | None = None

    @classmethod
    def judged(cls, judge: Judge, evidence: Evidence, **made) -> Outcome:
        return cls(evidence, judge.verdict(evidence), **made)

    def rejudge(self, judge: Judge, **news) -> None:
        """Judge again with more evidence (best-of-N's duplicate_of)."""
        self.evidence = replace(self.evidence, **news)
        self.verdict = judge.verdict(self.evidence)
