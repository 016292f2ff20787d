"""Assemble BENCHMARKS.md from docs/benchmarks/HEADER.md and the per-topic files in docs/benchmarks/.

    python benchmarks/assemble.py           # write BENCHMARKS.md
    python benchmarks/assemble.py --check   # exit 1 if BENCHMARKS.md is out of date or a rule is broken

Each topic file is a Markdown page of its own (its links are relative to docs/benchmarks/);
in BENCHMARKS.md its headings move down one level and its relative links are rewritten to
be relative to the repository root. Lines inside fenced code blocks are copied unchanged
(a ``# comment`` in a shell block is not a heading).

Rules checked on every run (the script refuses to write a file that breaks them):

* every topic file links at least one raw output under ``benchmarks/results/``, and every
  relative link of the header and the topics points at a file that exists;
* the header and the topic files do not speak of work sessions or issue numbers (that
  history lives in docs/benchmarks/history/, which is not assembled).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"
ORDER = [
    "core",
    "metrics",
    "export",
    "cli_default",
    "recovery",
    "structured",
    "layer_dropout",
    "moe",
    "distributed",
    "sparsegpt",
    "owl",
    "oneshot",
    "lora",
]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^(#{1,5}) ")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# wording that belongs to the history, not to the reference
FORBIDDEN = re.compile(r"\bsessions?\b|\bissues? \d+|(?<![\w&/])#\d+\b", re.I)


def _outside_fences(text: str):
    """Yield (line, inside_fence) for every line of ``text`` (line endings kept)."""
    fence = None
    for line in text.splitlines(keepends=True):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            yield line, True
        elif fence is not None:
            if m and m.group(1).startswith(fence) and not line.strip()[len(m.group(1)) :].strip():
                fence = None
            yield line, True
        else:
            yield line, False


def demote_headings(text: str) -> str:
    """Move every Markdown heading down one level, leaving fenced code blocks alone."""
    return "".join(line if fenced else HEADING.sub(r"#\1 ", line) for line, fenced in _outside_fences(text))


def _is_relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, re.I)


def rebase_links(text: str, source_dir: Path, target_dir: Path) -> str:
    """Rewrite the relative Markdown links of ``text`` (written from ``source_dir``) so that
    they resolve from ``target_dir``; code blocks are left alone."""

    def fix(m: re.Match) -> str:
        target = m.group(1)
        if not _is_relative(target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        new = Path(os.path.relpath((source_dir / path).resolve(), target_dir)).as_posix()
        return f"]({new}{'#' + anchor if anchor else ''})"

    return "".join(line if fenced else LINK.sub(fix, line) for line, fenced in _outside_fences(text))


def problems(name: str, text: str, source_dir: Path) -> list[str]:
    """Broken rules in one source file (see the module docstring)."""
    out = []
    targets = [m.group(1) for line, fenced in _outside_fences(text) if not fenced for m in LINK.finditer(line)]
    for target in targets:
        if _is_relative(target) and not (source_dir / target.partition("#")[0]).exists():
            out.append(f"{name}: broken link {target}")
    if name != "HEADER.md" and not any(
        "benchmarks/results/" in (source_dir / t).resolve().as_posix() for t in targets if _is_relative(t)
    ):
        out.append(f"{name}: links no raw output under benchmarks/results/")
    for n, line in enumerate(text.splitlines(), 1):
        m = FORBIDDEN.search(line)
        if m:
            out.append(f"{name}:{n}: history wording {m.group(0)!r} (move it to docs/benchmarks/history/)")
    return out


def assemble() -> tuple[str, list[str]]:
    """The text of BENCHMARKS.md and the list of broken rules."""
    header = (DOCS / "HEADER.md").read_text(encoding="utf-8")
    errors = problems("HEADER.md", header, DOCS)
    parts = [rebase_links(header, DOCS, ROOT).rstrip() + "\n"]
    for name in ORDER:
        text = (DOCS / f"{name}.md").read_text(encoding="utf-8")
        errors += problems(f"{name}.md", text, DOCS)
        text = rebase_links(demote_headings(text), DOCS, ROOT)
        parts.append(f"\n<!-- from docs/benchmarks/{name}.md -->\n" + text.rstrip() + "\n")
    return "\n".join(parts), errors


def _self_check() -> None:
    """The assembler's own behaviour on a tiny input (the old version broke this)."""
    src = "# Topic\n\n```bash\n# a comment, not a heading\nrun --x\n```\n\n## Part\n"
    want = "## Topic\n\n```bash\n# a comment, not a heading\nrun --x\n```\n\n### Part\n"
    got = demote_headings(src)
    assert got == want, f"demote_headings self-check failed:\n{got}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if BENCHMARKS.md is stale or a rule fails")
    args = ap.parse_args()
    _self_check()
    text, errors = assemble()
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    out = ROOT / "BENCHMARKS.md"
    if args.check:
        if out.read_text(encoding="utf-8") != text:
            print("BENCHMARKS.md is out of date: run python benchmarks/assemble.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
