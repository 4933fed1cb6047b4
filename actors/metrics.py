"""The worker's counters and shard latency, for the Ray dashboard and Prometheus."""

from __future__ import annotations

from sdfleet.schemas.layout import ShardStats


class Metrics:
    """Counters and a latency histogram through ray.util.metrics: the Ray dashboard and Prometheus
    see them. Outside Ray they are not recorded."""

    def __init__(self, job: str):
        self.enabled = False
        try:
            import ray
            from ray.util import metrics
        except ImportError:
            return
        if not ray.is_initialized():
            return
        tags = ("job",)
        self.tags = {"job": job}
        self.counters = {
            key: metrics.Counter(f"sdfleet_{key}", description=text, tag_keys=tags)
            for key, text in (
                ("images_generated", "images generated (all statuses but failed)"),
                ("images_filtered", "images filtered by the safety detector"),
                ("images_failed", "samples that could not be generated"),
                ("gpu_seconds", "GPU-seconds held while making shards"),
                ("shards_committed", "shards committed"),
            )
        }
        # Shard latency from a few seconds (tiny shards) to hours (10,000 large images on one GPU).
        self.latency = metrics.Histogram(
            "sdfleet_shard_seconds",
            description="wall time per shard",
            boundaries=[1, 5, 15, 60, 300, 900, 3600, 10800],
            tag_keys=tags,
        )
        self.enabled = True

    def record(self, stats: ShardStats) -> None:
        if not self.enabled:
            return
        values = {
            "images_generated": stats.ok + stats.filtered,
            "images_filtered": stats.filtered,
            "images_failed": stats.failed,
            "gpu_seconds": stats.gpu_seconds,
            "shards_committed": 1,
        }
        for key, value in values.items():
            if value:
                self.counters[key].inc(value, tags=self.tags)
        self.latency.observe(stats.wall_seconds, tags=self.tags)
