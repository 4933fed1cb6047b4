"""`sdfleet withdraw OUTPUT SHARD...`: take back commits that can never be made right, so that a
rerun makes those shards again.

Only a commit whose files are not what it names, and cannot be made so, is withdrawn: the staged
files it would publish are gone (uploads aborted, or expired by a bucket's lifecycle rule), or
something other than sdfleet changed its files. A healthy shard, and one whose writer merely died
before publishing (which this command, like any reader, rolls forward first), is refused: the
command never takes back a good shard, which is what makes it the safe way out.
"""

from __future__ import annotations

from sdfleet.actors.writer import committed_file_problems
from sdfleet.jobs.lease import DriverLease
from sdfleet.jobs.output import OutputReader
from sdfleet.schemas import layout
from sdfleet.schemas.errors import SpecError


def withdraw(reader: OutputReader, shards: list[str]) -> list[str]:
    """Withdraw these shards' commits, after checking that each is beyond repair. Returns one line
    per shard saying what was wrong with it."""
    storage = reader.storage
    # 1. Not while a driver runs the job: its workers may be committing these shards right now.
    active = DriverLease(storage, reader.job).active()
    if active:
        raise SpecError(
            f"{storage.url()} is being written by a driver ({active}); withdraw once it has ended"
        )
    # 2. Roll forward whatever can be; what is left wrong is beyond repair.
    survey = reader.survey(refresh=True)
    problems = reader.verify()
    for shard in shards:
        stats = survey.committed.get(shard)
        if stats is None:
            raise SpecError(
                f"shard {shard} is not committed in {storage.url()}: there is nothing to withdraw"
            )
        if shard not in problems:
            found = committed_file_problems(storage, stats, deep=True)
            if not found:
                raise SpecError(
                    f"shard {shard} in {storage.url()} has its files as its commit names them; "
                    "a good commit is never withdrawn"
                )
            problems[shard] = found
    # 3. The dataset is no longer complete: its marker goes first.
    if storage.exists(layout.SUCCESS_FILE):
        storage.delete(layout.SUCCESS_FILE)
    # 4. The commits, then whatever they still had staged.
    lines = []
    for shard in shards:
        stats = survey.committed[shard]
        storage.delete(layout.stats_file(shard))
        for final, staged in stats.files.items():
            storage.discard(final, staged)
        lines.append(f"withdrew shard {shard}: {'; '.join(problems[shard])}")
    return lines
