"""What a preview refuses."""

from __future__ import annotations

from sdfleet.schemas.errors import UserError


class PreviewError(UserError, ValueError):
    """A preview that cannot be made as asked (bad axis, unknown prompt id, conflicting options)."""
