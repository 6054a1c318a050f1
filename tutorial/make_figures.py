"""Regenerate the tutorial's committed pictures (tutorial/*.png) by running the chapters that
draw them, with their output directory set to tutorial/ (needs ``pip install ".[plot]"``).

    python tutorial/make_figures.py

The pictures are made by the chapters' own code, so they always show what a reader running the
chapter gets. The tests run the same chapters into a temporary directory instead.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_chapters  # noqa: E402


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = 0
    for c in run_chapters.chapters():
        if run_chapters.OUT_VAR not in c.read_text(encoding="utf-8"):      # draws no picture
            continue
        problems, secs, _ = run_chapters.check_chapter(c, here, cwd=here.parent)
        failed += run_chapters.report(c, problems, secs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
