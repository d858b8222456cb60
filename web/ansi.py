"""
ANSI colours to HTML, for the server-side part of the tail view.

L{ansi_to_tags} turns log text holding SGR escape sequences (C{ESC[...m}) into
a list of L{twisted.web.template} values: plain strings and C{<span>} tags with
the classes C{ansi-fg-<0-7>}, C{ansi-bg-<0-7>} and C{ansi-bright}. URLs
(C{http://} and C{https://}) become links. Nothing here builds markup by
string concatenation, so every byte of the log is escaped when rendered.

Supported SGR parameters: 0 (reset), 1 (bright), 22 (normal intensity),
30-37 / 90-97 (foreground; 90-97 also bright), 39 (default foreground),
40-47 / 100-107 (background), 49 (default background). Other escape sequences
are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.web.template import tags

#: A CSI sequence: ESC [ parameters final-byte.
_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
#: Other escapes (two-byte ESC sequences, OSC up to BEL/ST) and stray ESCs.
_OTHER_ESC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?")
_URL = re.compile(r"https?://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}]")
#: Control characters other than newline and tab are not shown.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Style:
    """
    The SGR state: foreground and background colour numbers and brightness.
    """

    fg: int | None = None
    bg: int | None = None
    bright: bool = False

    def classes(self) -> str:
        """
        The span classes for this state (empty for the default style).
        """
        out = []
        if self.fg is not None:
            out.append(f"ansi-fg-{self.fg}")
        if self.bg is not None:
            out.append(f"ansi-bg-{self.bg}")
        if self.bright:
            out.append("ansi-bright")
        return " ".join(out)


DEFAULT = Style()


def apply_sgr(style: Style, params: str) -> Style:
    """
    The style after one C{ESC[<params>m} sequence.
    """
    fg, bg, bright = style.fg, style.bg, style.bright
    codes = [p for p in params.split(";")] if params else ["0"]
    for code in codes:
        try:
            n = int(code) if code else 0
        except ValueError:
            continue
        if n == 0:
            fg, bg, bright = None, None, False
        elif n == 1:
            bright = True
        elif n == 22:
            bright = False
        elif 30 <= n <= 37:
            fg = n - 30
        elif 90 <= n <= 97:
            fg, bright = n - 90, True
        elif n == 39:
            fg = None
        elif 40 <= n <= 47:
            bg = n - 40
        elif 100 <= n <= 107:
            bg = n - 100
        elif n == 49:
            bg = None
    return Style(fg, bg, bright)


def linkify(text: str) -> list[Any]:
    """
    C{text} as strings and C{<a>} tags for each C{http(s)://} URL.
    """
    out: list[Any] = []
    pos = 0
    for match in _URL.finditer(text):
        if match.start() > pos:
            out.append(text[pos : match.start()])
        url = match.group(0)
        out.append(tags.a(url, href=url, rel="nofollow noopener"))
        pos = match.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def segments(text: str, style: Style = DEFAULT) -> tuple[list[tuple[Style, str]], Style]:
    """
    Split C{text} into C{(style, plain text)} runs; also return the style in
    force at the end (to continue with the next chunk).
    """
    runs: list[tuple[Style, str]] = []
    pos = 0
    for match in _CSI.finditer(text):
        if match.start() > pos:
            runs.append((style, text[pos : match.start()]))
        if match.group(2) == "m" and "?" not in match.group(1):
            style = apply_sgr(style, match.group(1))
        pos = match.end()
    if pos < len(text):
        runs.append((style, text[pos:]))
    cleaned = []
    for run_style, chunk in runs:
        chunk = _CONTROL.sub("", _OTHER_ESC.sub("", chunk))
        if chunk:
            cleaned.append((run_style, chunk))
    return cleaned, style


def ansi_to_tags(text: str, style: Style = DEFAULT) -> list[Any]:
    """
    Log text with ANSI colours as renderable values: strings and
    C{<span class="ansi-...">} tags, URLs linked.
    """
    out: list[Any] = []
    runs, _ = segments(text, style)
    for run_style, chunk in runs:
        classes = run_style.classes()
        content = linkify(chunk)
        if classes:
            out.append(tags.span(*content, class_=classes))
        else:
            out.extend(content)
    return out


def strip_ansi(text: str) -> str:
    """
    C{text} without any escape sequence.
    """
    return "".join(chunk for _, chunk in segments(text)[0])


__all__ = ["Style", "apply_sgr", "ansi_to_tags", "linkify", "segments", "strip_ansi"]
