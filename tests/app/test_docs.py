"""The docs: generated pages are current, and every relative link leads to a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def test_generated_pages_are_current() -> None:
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr).strip()


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page that are files of this repository (anchors dropped)."""
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_point_to_files() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages
              for target in relative_links(page) if not (page.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("[a](x.md#part) ![img](i/p.png) [w](https://e.org) [s](#here)\n"
                    "`[no](inline.md)`\n```\n[no](fenced.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["x.md", "i/p.png"]
