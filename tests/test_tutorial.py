"""Every tutorial chapter runs as a reader would run it, and still computes what it says.

Each chapter ``tutorial/NN-name.md`` runs in a fresh interpreter started in the repository root:
its ```python blocks are pasted line by line into an interactive console, as into the plain
``python`` prompt (``tutorial/run_chapters.py``). The test fails when a block raises (or would
not paste), when a ``RESULT name ...`` line of the chapter's text is not printed by its code, or
when the printed value no longer matches the stated one within the stated tolerance. Pictures
go to a temporary directory, never over the committed ones. Timings are printed, not checked."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_chapters", ROOT / "tutorial" / "run_chapters.py")
run_chapters = importlib.util.module_from_spec(_spec)
sys.modules["run_chapters"] = run_chapters
_spec.loader.exec_module(run_chapters)

CHAPTERS = run_chapters.chapters()


def test_chapters_exist_and_index_links_them():
    assert len(CHAPTERS) >= 5
    index = (ROOT / "tutorial" / "README.md").read_text(encoding="utf-8")
    for c in CHAPTERS:
        assert f"({c.name})" in index, f"tutorial/README.md does not link {c.name}"


def test_runner_catches_what_the_prompt_refuses(tmp_path):
    """A compound statement followed directly by an unindented line is a SyntaxError at the
    prompt, though ``exec`` accepts it: the runner must fail it."""
    bad = tmp_path / "99-bad.md"
    bad.write_text("```python\nfor i in range(2):\n    x = i\nprint('RESULT x = 1')\n```\n\nRESULT x = 1\n")
    problems, _, _ = run_chapters.check_chapter(bad, tmp_path)
    assert problems and "failed" in problems[0]
    good = tmp_path / "98-good.md"
    good.write_text("```python\nfor i in range(2):\n    x = i\n\nprint(f'RESULT x = {x}')\n```\n\nRESULT x = 1\n")
    assert run_chapters.check_chapter(good, tmp_path)[0] == []
    wrong = tmp_path / "97-wrong.md"
    wrong.write_text("```python\nprint('RESULT x = 2')\n```\n\nRESULT x = 1 ± 0.5\nRESULT y < 3\n")
    problems = run_chapters.check_chapter(wrong, tmp_path)[0]
    assert any(p.startswith("x:") for p in problems) and any(p.startswith("y:") for p in problems)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter(chapter, tmp_path):
    problems, secs, _ = run_chapters.check_chapter(chapter, tmp_path, cwd=ROOT)
    print(f"{chapter.name}: {secs:.1f} s")
    assert not problems, f"{chapter.name}:\n" + "\n".join(problems)
    committed = {p.name for p in (ROOT / "tutorial").glob("*.png")}
    for png in tmp_path.glob("*.png"):
        assert png.name in committed, f"{chapter.name} makes {png.name}, which is not committed (run tutorial/make_figures.py)"
