"""The HTML gallery: one self-contained page of thumbnails, filters and each sample's whole row.

The page is `gallery.html.j2`, rendered with autoescaping on: every value from the output (keys,
statuses, prompts, errors, the spec) reaches the page as text, never as markup, whatever the
Parquet holds. The rows go in as JSON through `tojson`, which escapes <, > and & (so no value can
close the <script> that holds them).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import math
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.preview.draw import decode, nsfw_label
from sdfleet.jobs.preview.files import write_output
from sdfleet.jobs.preview.text import clean, fmt_value
from sdfleet.schemas import layout
from sdfleet.schemas.json_values import json_value
from sdfleet.schemas.rows import (
    STATUS_DUPLICATE,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_SKIPPED,
    STATUSES,
)

TEMPLATE = "gallery.html.j2"
BASE_STATUSES = (STATUS_OK, STATUS_FILTERED, STATUS_FAILED)  # always a filter, in this order


# The scores a page can be sorted by, where its rows have them: curation's, then safety's.
SORT_COLUMNS = ("clip_score", "aesthetic_score", "punsafe", "nsfw_score")


def page_statuses(reader: OutputReader) -> list[str]:
    """The page's filters: the base statuses, and curation's where the output has any."""
    totals = reader.survey().totals()
    return [s for s in STATUSES if s in BASE_STATUSES or totals.count(s)]


EMBED_AS_IS_BYTES = (
    48 * 1024
)  # images this small go in exact; above, a JPEG thumbnail is far smaller
THUMB_PX = 256  # thumbnails stay sharp when the detail view enlarges them to 384 px
CARD_PX = 160  # a card's image box (CSS `.card img`); smaller images are enlarged with crisp pixels
SAFE_INT = 2**53  # JSON.parse rounds integers beyond this


def html_gallery(
    reader: OutputReader,
    out_name: str = layout.GALLERY_PAGE,
    show_filtered: bool = False,
    *,
    limit: int = 500,
    out_path: str | None = None,
) -> str:
    """Write a static, self-contained gallery page into the output and return its path or URI.

    The page shows the first `limit` rows of each status in key order: thumbnails of ok images,
    labelled cards for filtered and failed rows (filtered images only with show_filtered, from
    quarantine/), each with its status and nsfw score; a filter by status and a text search; and
    on click the sample's whole Parquet row as a table (nsfw_scores per class included). `#KEY` in
    the address opens that sample. Plain HTML, CSS and a little vanilla JS: no CDN, no network.

    Why thumbnails are embedded as data: URIs instead of extracted to preview/images/: the page is
    one object, so it opens the same from a local folder (file://) and from ONE presigned S3 URL.
    A presigned URL signs one object only: relative links from a presigned page to other private
    objects would be refused (403). It also adds no image files beside the tars. The cost is page
    size: images up to 256 px and 48 KB go in as they are (exact pixels), larger ones as 256 px
    JPEG thumbnails (~10-20 KB each), so the default of 500 rows per status stays a few MB; the
    click view shows the same thumbnail enlarged, not the full image (that stays in the tar).

    On S3, open it with `gallery_link(reader, out_name)`: a presigned HTTPS URL (valid `expiration`
    seconds, at most 7 days with SigV4; it must be signed by credentials that can read the object, and
    the endpoint must be reachable from the browser: a MinIO/moto endpoint on localhost only is not).
    `out_path` writes the page elsewhere instead (a local file or a URI).
    """
    page = _render_page(reader, gallery_rows(reader, limit), show_filtered).encode()
    if out_path is not None:
        return write_output(reader.storage, out_path, page)
    reader.storage.write_bytes(out_name, page)
    return reader.storage.path(out_name) if reader.storage.local else reader.storage.url(out_name)


def gallery_link(
    reader: OutputReader, out_name: str = layout.GALLERY_PAGE, expiration: int = 3600
) -> str:
    """An address a browser can open: file:// locally, a presigned HTTPS URL on S3 (see html_gallery)."""
    storage = reader.storage
    if storage.local:
        return Path(storage.path(out_name)).as_uri()
    return storage.fs.sign(storage.path(out_name), expiration=expiration)


def gallery_rows(reader: OutputReader, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of each status, in key order (so every status filter has something).
    Shards are read in order until every status has its rows, or after max(20 * limit, 20,000) rows:
    a dataset without failed rows is not read to its end to look for some."""
    taken = {s: 0 for s in page_statuses(reader)}
    out, scanned, budget = [], 0, max(20 * limit, 20_000)
    for shard in reader.shards:
        for row in reader.rows(shard):
            status = row["status"] if row["status"] in taken else STATUS_FAILED
            if taken[status] < limit:
                taken[status] += 1
                out.append(row)
        scanned += len(reader.rows(shard))
        if all(n >= limit for n in taken.values()) or scanned >= budget:
            break
    return out


def _render_page(reader: OutputReader, rows: list[dict[str, Any]], show_filtered: bool) -> str:
    """The page for these rows (see html_gallery), as HTML text."""
    images = reader.images(r for r in rows if reader.has_image(r, show_filtered))
    statuses = page_statuses(reader)
    shown = {s: sum(1 for r in rows if r["status"] == s) for s in statuses}
    totals = reader.survey().totals()  # what the committed shards hold: the page may show fewer
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            title=f"{reader.name}: preview",
            heading=reader.name,
            where=reader.storage.url(),
            summary=_spec_summary(reader.job["spec"]),
            note="filtered images shown (from quarantine/)"
            if show_filtered
            else "filtered images hidden",
            filters=[{"status": s, "shown": shown[s], "total": totals.count(s)} for s in statuses],
            sort_columns=[c for c in SORT_COLUMNS if any(r.get(c) is not None for r in rows)],
            cards=[_card(r, images.get(r["key"]), show_filtered) for r in rows],
            rows=[{k: _jsonable(v) for k, v in r.items() if not k.startswith("_")} for r in rows],
        )
    )


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sdfleet.jobs.preview", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    # tojson sorts keys by default; the detail table lists a row's columns in the Parquet's order.
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "allow_nan": False}
    return env


def _spec_summary(spec: dict[str, Any]) -> list[str]:
    """The model and the sweep, one short item each."""
    sweep = spec["sweep"]
    summary = [f"model {fmt_value(spec['model']['source'], 80)}"]
    summary += [
        f"{k}: {', '.join(fmt_value(v) for v in vals)}" for k, vals in sweep["axes"].items()
    ]
    summary.append(f"seeds: {fmt_value(sweep['seeds'])}")
    return summary


def _card(
    row: dict[str, Any], image: tuple[str, bytes] | None, show_filtered: bool
) -> dict[str, Any]:
    """One card's values, as plain text: the template escapes them."""
    status = row["status"]
    width, height = int(row.get("width") or 0), int(row.get("height") or 0)
    card = {
        "key": row["key"],
        "status": status,
        "flagged": bool(row.get("safety_flagged")),
        "score": nsfw_label(row).strip() or "nsfw -",
        "prompt": clean(row.get("prompt") or ""),
        "image": None,
    }
    if image is not None:
        card.update(
            image=_thumbnail_data_uri(*image, width, height), pixelated=max(width, height) < CARD_PX
        )
    else:
        card["why"] = {
            STATUS_FILTERED: "filtered" + ("" if show_filtered else " (hidden)"),
            STATUS_FAILED: "failed",
            STATUS_REJECTED: f"rejected: {row.get('rejected_by') or '?'}",
            STATUS_DUPLICATE: f"duplicate of {row.get('duplicate_of') or '?'}",
            STATUS_SKIPPED: "skipped (not needed)",
        }.get(status, "image missing")
        card["detail"] = clean(
            (row.get("error") if status == STATUS_FAILED else card["score"]) or ""
        )
    return card


def _thumbnail_data_uri(ext: str, encoded: bytes, width: int, height: int) -> str:
    """Small images go in as they are (exact pixels); larger ones as a 256 px JPEG thumbnail."""
    if len(encoded) <= EMBED_AS_IS_BYTES and max(width, height) <= THUMB_PX:
        mime, data = layout.MIME_TYPES[ext], encoded
    else:
        image = decode(encoded)
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        mime, data = "image/jpeg", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _jsonable(value: Any) -> Any:
    """A Parquet value as JSON the browser reads back exactly. Integers past 2**53 (the 63-bit seeds)
    become strings: JSON.parse would round them to the nearest double and show a wrong seed."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > SAFE_INT:
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return json_value(value, None)  # decimals, times, durations: as the tars' JSON holds them
