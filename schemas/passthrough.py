"""input.passthrough_columns: the input columns copied into every output row, each under its own
name (the list form) or under a new one (the mapping form, input name -> output name), so that an
input column named like one of sdfleet's own (`created_at`, `seed`) can still be kept.

The owner of the rule that maps input names to output names, and of the message a clash gives.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _check(value: Any) -> Any:
    """A list of names or a mapping of names to names, the names not empty and the output names
    distinct; a mapping that renames nothing becomes the list it means, so that both forms of one
    job have one fingerprint. Said here, in one line, before pydantic tries the two forms."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(c, c) for c in value]
    else:
        raise ValueError(f"give a list of input columns, or {FORM}")
    for source, target in pairs:
        if not (isinstance(source, str) and isinstance(target, str)):
            what = (
                f"{source!r}: {target!r} does not map a column name to a column name"
                if isinstance(value, dict)
                else f"{source!r} is not a column name"
            )
            raise ValueError(f"{what}; give a list of input columns, or {FORM}")
        if not source.strip() or not target.strip():
            raise ValueError(
                f"{source!r}: {target!r} has an empty name; give each input column and the output "
                "column it becomes a name"
            )
    targets = [t for _, t in pairs]
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice is not None:
        raise ValueError(f"output column {twice!r} is named twice; give each its own name")
    if isinstance(value, dict) and all(s == t for s, t in pairs):
        return list(value)
    return value


FORM = "a mapping input column: output column (e.g. {created_at: source_created_at})"

# The spec's type: a list of input columns (kept under their names), or a mapping input column ->
# output column.
PassthroughColumns = Annotated[list[str] | dict[str, str], BeforeValidator(_check)]


def renames(columns: list[str] | dict[str, str]) -> dict[str, str]:
    """Input column -> output column, in the order the spec gives them."""
    return dict(columns) if isinstance(columns, dict) else {c: c for c in columns}


def ordered_for_fingerprint(columns: Any) -> Any:
    """The mapping form as [input, output] pairs, so that the fingerprint (whose JSON sorts a
    mapping's keys) sees the order, which is the output columns' order; the list form as it is."""
    return [[s, t] for s, t in columns.items()] if isinstance(columns, dict) else columns


class PassthroughClash(ValueError):
    """A passthrough column's output name is one of sdfleet's own output columns."""

    def __init__(self, column: str):
        super().__init__(
            f"passthrough column {column!r} clashes with sdfleet's output column {column}"
        )
        self.column = column


def clash_message(columns: list[str] | dict[str, str], clash: PassthroughClash) -> str:
    """The clash said with the input column, the output column and the spec that fixes it."""
    target = clash.column
    source = next((s for s, t in renames(columns).items() if t == target), target)
    fix = f"passthrough_columns: {{{source}: source_{target}}}"
    if source == target:
        return (
            f"input column {source!r} clashes with sdfleet's output column {target}: rename it, "
            f"input.{fix}"
        )
    return (
        f"input column {source!r} is renamed to {target!r}, which clashes with sdfleet's output "
        f"column {target}: choose another name, e.g. input.{fix}"
    )
