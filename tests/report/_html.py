"""A small reading of the report's HTML for the tests (standard library only): ids, tables, links, images, text."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Page:
    ids: list[str] = field(default_factory=list)
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    srcs: list[str] = field(default_factory=list)
    hrefs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    text: str = ""
    section_text: dict[str, str] = field(default_factory=dict)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._sections: list[tuple[str, list[str]]] = []
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.page.tags.append(tag)
        if a.get("id"):
            self.page.ids.append(str(a["id"]))
        if a.get("src") is not None:
            self.page.srcs.append(str(a["src"]))
        if a.get("href") is not None:
            self.page.hrefs.append(str(a["href"]))
        if tag == "section":
            self._sections.append((str(a.get("id", "")), []))
        elif tag == "table":
            self._table = str(a.get("id", f"table{len(self.page.tables)}"))
            self.page.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.page.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "section" and self._sections:
            sid, parts = self._sections.pop()
            self.page.section_text[sid] = " ".join("".join(parts).split())
            if self._sections:
                self._sections[-1][1].extend(parts)

    def handle_data(self, data: str) -> None:
        if self.lasttag in ("style", "title") and not self._sections:
            return  # the style sheet and the title are not the report's text
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._sections:
            self._sections[-1][1].append(data)

    def close(self) -> None:
        super().close()
        self.page.text = " ".join("".join(self._text).split())


def read_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page
