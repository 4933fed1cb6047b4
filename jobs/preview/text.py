"""Text on a preview: the font, fitting text to a width in pixels, and values written short."""

from __future__ import annotations

import functools
from typing import Any

from PIL import ImageFont

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@functools.lru_cache(maxsize=16)
def font(size: int) -> Font:
    """DejaVu Sans where the system has it (it covers accented Latin, Greek, Cyrillic), else Pillow's
    own scalable default font (Pillow >= 10.1 with FreeType), else its bitmap font."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_width(f: Font, text: str) -> float:
    return f.getlength(text) if hasattr(f, "getlength") else f.getbbox(text)[2]


def line_height(f: Font) -> int:
    # "Ág" spans the tallest accent and the deepest descender.
    top, bottom = f.getbbox("Ág")[1], f.getbbox("Ág")[3]
    return int(bottom - top) + 4 if bottom > top else 14


def clean(text: Any) -> str:
    """One line: runs of whitespace (newlines, tabs) become one space."""
    return " ".join(str(text).split()) if text is not None else ""


def truncate(text: str, f: Font, width: float) -> str:
    if text_width(f, text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if text_width(f, text[:mid].rstrip() + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def wrap(text: str, f: Font, width: float, max_lines: int, hard: bool = False) -> list[str]:
    """Word-wrap to `width` pixels; the last line is truncated with an ellipsis if text is left over.
    hard=True also breaks words wider than a line (a 19-digit seed in a narrow header)."""
    words, lines, current = clean(text).split(" "), [], ""
    if hard:
        words = [piece for word in words for piece in _split_word(word, f, width)]
    for i, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if text_width(f, candidate) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines - 1:
            current = " ".join(words[i:])
            break
    if current or not lines:
        lines.append(current)
    return [truncate(line, f, width) for line in lines[:max_lines]]


def _split_word(word: str, f: Font, width: float) -> list[str]:
    pieces = []
    while word and text_width(f, word) > width:
        n = max(
            1, max(i for i in range(1, len(word) + 1) if i == 1 or text_width(f, word[:i]) <= width)
        )
        pieces.append(word[:n])
        word = word[n:]
    return pieces + ([word] if word else [])


def fmt_value(value: Any, limit: int = 40) -> str:
    """A column value as a header or summary shows it: floats exact, strings on one line and short."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        value = clean(value)
        return '""' if value == "" else (value if len(value) <= limit else value[: limit - 1] + "…")
    return str(value)
