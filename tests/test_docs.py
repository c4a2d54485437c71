"""The project's own protocol notes (docs/) are what comments cite: every
``docs/protocol.md §N`` / ``docs/modem.md §N.M`` must name a section that exists,
and nothing may point outside the repository for them."""
from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("protocol.md", "modem.md")
CITE = re.compile(r"docs/(protocol|modem)\.md((?:(?:,| and)? ?§\d+(?:\.\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")


def _sections(name: str) -> set[str]:
    text = (REPO / "docs" / name).read_text(encoding="utf-8")
    found = set(re.findall(r"^## (\d+)\. ", text, re.M))            # ## 3. ES9+ …
    found |= set(re.findall(r"^### (\d+\.\d+) ", text, re.M))      # ### 3.2 Field encoding
    found |= set(re.findall(r"^\*\*(\d+\.\d+) ", text, re.M))       # **0.6 Signed data …**
    return found


def _sources():
    for sub in ("agent", "tests", "asn1"):
        for p in sorted((REPO / sub).rglob("*")):
            if p.suffix in (".py", ".asn") and p.is_file():
                yield p
    for name in ("DESIGN.md", "README.md", "docs/protocol.md", "docs/modem.md"):
        if (REPO / name).is_file():
            yield REPO / name


def test_docs_exist_with_numbered_sections():
    assert {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"} <= _sections("protocol.md")
    assert {"1", "2", "3", "4", "5", "6", "7"} <= _sections("modem.md")


def test_every_citation_names_an_existing_section():
    sections = {f"{d.split('.')[0]}": _sections(d) for d in DOCS}
    bad = []
    for path in _sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITE.finditer(text):
            for sec in SECTION.findall(m.group(2)):
                if sec not in sections[m.group(1)]:
                    line = text.count("\n", 0, m.start()) + 1
                    bad.append(f"{path.relative_to(REPO)}:{line}: docs/{m.group(1)}.md §{sec}")
    assert not bad, "citations of sections that do not exist:\n" + "\n".join(bad)


def test_nothing_depends_on_files_outside_the_repository():
    bad = []
    for path in _sources():
        if path.name == "test_docs.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in ("/work/shared", "../shared/", "landscape.md"):
            if needle in text:
                bad.append(f"{path.relative_to(REPO)}: {needle}")
    assert not bad, bad
