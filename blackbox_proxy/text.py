"""Plain-text helpers shared by data loading and corpus building."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment: tags removed, entities decoded, whitespace collapsed."""
    if not text:
        return ""
    p = _TextExtractor()
    p.feed(text)
    p.close()
    return re.sub(r"\s+", " ", html.unescape("".join(p.parts))).strip()
