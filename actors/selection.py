"""Best-of-N selection: which candidate slots to generate next, and which images to keep.

curation.images_per_prompt (k) of each prompt's candidate slots, in rounds: first the first k
slots of every prompt, then, for each prompt with fewer than k kept, as many more as it lacks,
until it has k or has tried them all. An image is kept if the judge passes it (safety and the
gates) and it is no duplicate of one kept before it, so the kept images are the first k passing in
slot (seed) order whatever the batching. Slots never tried are judged skipped by the shard.
"""

from __future__ import annotations

import numpy as np

from sdfleet.actors.judge import Judge, Outcome
from sdfleet.schemas.rows import STATUS_OK
from sdfleet.schemas.samples import Sample


class BestOfN:
    """The rounds of one shard's candidates (`todo`, in key order: each prompt's slots in order)."""

    def __init__(self, todo: list[Sample], images_per_prompt: int, dedup_threshold: float | None):
        self.k, self.threshold = images_per_prompt, dedup_threshold
        self.groups: dict[int, list[Sample]] = {}
        for s in todo:
            self.groups.setdefault(s.group, []).append(s)
        self.tried = dict.fromkeys(self.groups, 0)
        # Per prompt group, the kept images: (key, CLIP image embedding or None without curation).
        self.kept: dict[int, list[tuple[str, np.ndarray | None]]] = {g: [] for g in self.groups}

    def next_round(self) -> list[Sample]:
        """This round's candidates: what each prompt still lacks, from its next untried slots."""
        wave = []
        for g, candidates in self.groups.items():
            n = min(self.k - len(self.kept[g]), len(candidates) - self.tried[g])
            wave += candidates[self.tried[g] : self.tried[g] + n]
            self.tried[g] += n
        return wave

    def keep(self, wave: list[Sample], outcomes: dict[str, Outcome], judge: Judge) -> None:
        """Keep, in slot order, what passed and is not too close to an image kept before it; the
        judge makes those too close duplicates."""
        for s in wave:
            o = outcomes.get(s.key)
            if o is None or o.verdict.status != STATUS_OK:  # failed, filtered or rejected
                continue
            curation = o.evidence.curation
            if self.threshold is not None:
                duplicate_of = next(
                    (
                        key
                        for key, e in self.kept[s.group]
                        if float(np.dot(e, curation.embedding)) >= self.threshold
                    ),
                    None,
                )
                if duplicate_of:
                    o.rejudge(judge, duplicate_of=duplicate_of)
                    continue
            self.kept[s.group].append((s.key, curation.embedding if curation else None))
