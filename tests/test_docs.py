"""The documentation runs: every ```python block of docs/*.md (and of the README) is executed, and the README
stays in step with the docs pages and with .ci/run.

Blocks of one page run in order in one namespace (one test per page), in a fresh temporary working
directory that holds ``examples/assets`` (a link to this checkout's bundled tiny model and adapter), so
a page loads them as a reader in a jlora checkout would: ``"examples/assets/tiny-llama"``. Tracebacks
name the Markdown file and the line of the failing statement.

A block that cannot run here (it needs a Hub repo, a model that is not bundled, ...) is preceded by
``<!-- notest: why -->``; the reason is required, and such blocks are listed in the test ids below.
A page whose code must start in a fresh interpreter (e.g. it sets ``XLA_FLAGS`` before importing jax)
carries ``<!-- docs-test: own process -->`` and runs in a subprocess.

The docs site itself is built by ``.ci/run`` (``mkdocs build --strict``), not here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README = ROOT / "README.md"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_NOTEST = re.compile(r"^\s*<!--\s*notest\b:?(?P<why>.*?)-->\s*$")
OWN_PROCESS = "<!-- docs-test: own process -->"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    code: str
    notest: str | None  # the reason, for blocks marked not to run


def blocks(page: Path) -> list[Block]:
    """The fenced ```python blocks of ``page``, in order (``py`` and ``pycon`` are not used in the docs)."""
    lines = page.read_text().splitlines()
    found, i, previous = [], 0, ""
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        fence, indent, lang = m["fence"], len(m["indent"]), (m["info"].split() or [""])[0].lower()
        start, i = i + 1, i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            i += 1
        if lang == "python":
            code = "\n".join(line[indent:] for line in lines[start:i])
            why = _NOTEST.match(previous)
            found.append(Block(page, start + 1, code, why["why"].strip() if why else None))
        previous, i = "", i + 1
    return found


def _runner_source() -> str:
    """The program that runs one page's blocks (in this process or in a fresh one)."""
    return '''
import sys, json
def run_blocks(items):
    namespace = {"__name__": "__main__"}
    for path, line, code in items:
        exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
if __name__ == "__main__":
    run_blocks(json.loads(sys.stdin.read()))
'''


def _workdir(tmp_path: Path) -> Path:
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "assets").symlink_to(ROOT / "examples" / "assets", target_is_directory=True)
    return tmp_path


def test_docs_have_pages_and_code():
    assert PAGES, "no docs/*.md"
    assert sum(len(blocks(p)) for p in PAGES) >= 20


@pytest.mark.parametrize("page", [p for p in [README, *PAGES] if blocks(p)], ids=lambda p: p.name)
def test_page_code_runs(page, tmp_path, monkeypatch):
    runnable = [b for b in blocks(page) if b.notest is None]
    for b in blocks(page):
        if b.notest is not None:
            assert len(b.notest) >= 10, f"{page.name}:{b.line}: say why the block cannot run: <!-- notest: why -->"
    if not runnable:
        pytest.skip("every block is marked notest")
    items = [(str(b.page), b.line, b.code) for b in runnable]
    cwd = _workdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the docs never reach the Hub when tested
    if OWN_PROCESS in page.read_text():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _runner_source()], input=json.dumps(items), cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        return
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(_runner_source(), namespace)
    namespace["run_blocks"](items)


def test_notest_blocks_are_few():
    """Blocks that are not run stay the exception (each with its reason)."""
    all_blocks = [b for p in PAGES for b in blocks(p)]
    skipped = [f"{b.page.name}:{b.line} ({b.notest})" for b in all_blocks if b.notest is not None]
    assert len(skipped) <= max(3, len(all_blocks) // 5), skipped


def test_api_reference_lists_every_public_name():
    """docs/api.md has a ``::: path`` directive for each name of ``jlora.__all__``, each resolving to that object
    (a function named like its module, e.g. ``jlora.load``, is written ``jlora.load.load``)."""
    import importlib

    import jlora
    documented = {}
    for path in re.findall(r"^::: (jlora[\w.]*)\s*$", (DOCS / "api.md").read_text(), re.MULTILINE):
        module, _, name = path.rpartition(".")
        documented[name] = getattr(importlib.import_module(module), name)
    assert set(documented) == set(jlora.__all__), set(jlora.__all__) ^ set(documented)
    wrong = [name for name, obj in documented.items() if obj is not getattr(jlora, name)]
    assert not wrong, wrong


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, re.MULTILINE))
    assert listed == {p.name for p in PAGES}, listed ^ {p.name for p in PAGES}


def test_readme_links_to_docs_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert links, "the README links to no docs page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing
    assert {p.name for p in PAGES} - {"index.md"} <= {Path(link).name for link in links}


def test_readme_test_command_is_the_ci_command():
    """.ci/run runs the README's test command verbatim (its comment says so)."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_line = next(line for line in ci if "python -m pytest" in line and not line.lstrip().startswith("#"))
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    assert ci_line in commands, (ci_line, commands)


def test_docs_build_command_is_in_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in ci
    assert "mkdocs serve" in (ROOT / "README.md").read_text()


def test_supported_libraries_tables_name_tests_that_exist():
    """The README's "Supported libraries" table and docs/libraries.md's table name, in each row, tests that exist
    (a path, a folder or a glob such as ``tests/test_parity_*.py``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Supported libraries", 1)[1].split("\n## ", 1)[0]
    tables = [section, (DOCS / "libraries.md").read_text().split("\n## ", 1)[0]]
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ") and "tests/" in line]
        assert len(rows) >= 4, rows
        for row in rows:
            for path in re.findall(r"`(tests/[^`]+)`", row):
                assert list(ROOT.glob(path.rstrip("/"))), f"{path} (in: {row[:60]}...) does not exist"
