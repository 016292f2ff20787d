"""Assemble BENCHMARKS.md from its header and the per-topic files in docs/benchmarks/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["core", "metrics", "export", "cli_default", "structured", "layer_dropout", "distributed", "sparsegpt", "lora"]


def main() -> None:
    parts = [(ROOT / "docs" / "benchmarks" / "HEADER.md").read_text(encoding="utf-8").rstrip() + "\n"]
    for name in ORDER:
        text = (ROOT / "docs" / "benchmarks" / f"{name}.md").read_text(encoding="utf-8")
        # demote headings one level so each topic is a section of BENCHMARKS.md
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
        parts.append(f"\n<!-- from docs/benchmarks/{name}.md -->\n" + text.rstrip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts), encoding="utf-8")


if __name__ == "__main__":
    main()
