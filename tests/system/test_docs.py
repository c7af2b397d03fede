"""The documentation is tested: every bash and python block in README.md and docs/ runs here,
or carries `<!-- skip: REASON -->` (conventions: tests/support/docs_helpers.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.docs_helpers import DATA, ROOT, RUNS, blocks, run_page, session_model, workspace

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
IDS = [str(p.relative_to(ROOT)) for p in PAGES]


@pytest.fixture(scope="session")
def my_model(tmp_path_factory):
    pytest.importorskip("torch")
    return session_model(tmp_path_factory.mktemp("docs-model"))


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_block_runs_or_says_why_not(page):
    for block in blocks(page):
        assert block.lang in RUNS + DATA, (
            f"{block.where}: a code block needs a language ({', '.join(RUNS + DATA)}), "
            f"got {block.lang!r}"
        )
        if block.marker == "skip":
            assert len(block.arg.strip()) >= 3, f"{block.where}: a skip marker needs its reason"
        if block.marker == "background":
            assert block.arg.startswith("http://127.0.0.1:"), (
                f"{block.where}: a background block names the local URL to wait for"
            )


def test_exactly_one_block_makes_the_model():
    makers = [b for b in blocks(ROOT / "README.md") if b.marker == "makes"]
    assert [b.arg for b in makers] == ["my-model"]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_page_runs(page, my_model, tmp_path):
    if not any(b.lang in RUNS and b.marker not in ("skip", "makes") for b in blocks(page)):
        pytest.skip("no block to run on this page")
    run_page(page, workspace(tmp_path / "page", my_model))


def test_setup_commands_are_what_ci_runs():
    """README's two set-up one-liners install what .ci/run installs: the same torch command,
    and extras that CI's editable install covers."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_extras = set(re.search(r'pip install -q -e "\.\[([a-z,]+)\]"', ci)[1].split(","))
    readme = blocks(ROOT / "README.md")
    setups = [
        b.code
        for b in readme
        if b.code.startswith("python3 -m venv") and "\n" not in b.code.strip()
    ]
    assert len(setups) == 2, "README: the two set-up one-liners"
    for code in setups:
        torch, project = re.findall(r"pip install ([^&\n]+?)\s*(?:&&|$)", code)
        assert f"pip install -q {torch}\n" in ci, f"README's torch step {torch!r} is not .ci/run's"
        extras = set(re.fullmatch(r'-e "\.\[([a-z,]+)\]"', project)[1].split(","))
        assert extras <= ci_extras, f"README installs {extras - ci_extras}, which CI does not"
    assert "python -m pytest -q" in setups[1] and "\npython -m pytest -q\n" in ci


def test_generated_pages_are_current():
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_readme_links_resolve():
    """README.md is not part of the site, so mkdocs cannot check its links: every relative
    link must name a file or folder of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = ROOT / target.split("#", 1)[0]
        assert path.exists(), f"README.md links to {target}, which does not exist"


REPO_PATH = re.compile(
    r"`((?:diffcse_runtime|diffcse_train|diffcse_export|tests|benchmarks|examples|configs|docs)"
    r"/[\w./-]*)(?::\w+)?`"
)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_repository_paths_named_exist(page):
    """A file or folder of this repository named in backticks exists, so a page cannot keep
    pointing at a module after it moved."""
    text = page.read_text(encoding="utf-8")
    for path in REPO_PATH.findall(text):
        if any(c in path for c in "*{<") or path.endswith("NAME.json"):
            continue  # a pattern, not a path
        assert (ROOT / path.rstrip("/")).exists(), f"{page.relative_to(ROOT)} names {path}"
