"""benchmarks/assemble.py: headings, fenced code blocks, links, and BENCHMARKS.md up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assemble():
    spec = importlib.util.spec_from_file_location("bench_assemble", ROOT / "benchmarks" / "assemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comment_lines_in_fenced_code_stay_comments(assemble):
    src = "# Topic\n\n```bash\n# all three metrics\nrun --x\n```\n\n~~~\n## not a heading\n~~~\n\n## Part\n"
    out = assemble.demote_headings(src)
    assert out.splitlines()[0] == "## Topic"
    assert "# all three metrics\n" in out and "## all three metrics" not in out
    assert "\n## not a heading\n" in out
    assert out.rstrip().endswith("### Part")


def test_indented_fence_inside_a_list_item(assemble):
    src = "* Command:\n\n  ```\n  # comment\n  run\n  ```\n# After\n"
    out = assemble.demote_headings(src)
    assert "  # comment\n" in out and out.rstrip().endswith("## After")


def test_links_are_rebased_to_the_repository_root(assemble):
    docs = assemble.DOCS
    text = "[raw](../../benchmarks/results/x.json), [h](history/core.md#a), [w](https://x.y/a), [s](#sec)\n"
    out = assemble.rebase_links(text, docs, assemble.ROOT)
    assert "[raw](benchmarks/results/x.json)" in out
    assert "[h](docs/benchmarks/history/core.md#a)" in out
    assert "[w](https://x.y/a)" in out and "[s](#sec)" in out


def test_history_wording_is_refused(assemble):
    errs = assemble.problems("x.md", "Measured in the second session (issue 4, see #9).\n", assemble.DOCS)
    assert len([e for e in errs if "history wording" in e]) == 1
    assert any("no raw output" in e for e in errs)


def test_benchmarks_md_is_assembled_and_clean(assemble):
    text, errors = assemble.assemble()
    assert errors == []
    assert (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8") == text
