"""mkdocs hook: publish benchmarks/notes/*.md as the site's notes/ pages.

The notes live beside the benchmarks they describe (benchmarks/notes/); the site shows them
under notes/ without a copy in docs/, so there is one file per note to keep true.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

NOTES = Path(__file__).resolve().parents[1] / "benchmarks" / "notes"


def on_files(files: Files, config) -> Files:
    for path in sorted(NOTES.glob("*.md")):
        files.append(File.generated(config, f"notes/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    # a note links the benchmarks index as ../README.md (right on GitHub); on the site that
    # index is benchmarks.md
    if page.file.src_uri.startswith("notes/"):
        return markdown.replace("](../README.md)", "](../benchmarks.md)")
    return markdown
