"""Run the tutorial's chapters as a reader would, and check what they say they compute.

Each chapter ``tutorial/NN-name.md`` is run in a fresh interpreter (a subprocess): its ```python
blocks are pasted, in order, line by line into an interactive console, as into the plain
``python`` prompt (so a block that only works under ``exec`` fails here too). A block that raises
fails the chapter.

A chapter states its results in its text as lines ``RESULT name = value`` (optionally
``± tol``) or ``RESULT name < bound`` / ``RESULT name > bound``, and its code prints
``RESULT name = value``. Every stated result must be printed and agree: ``=`` within the stated
tolerance (default: relative 2% or absolute 1e-6, whichever is larger), ``<`` / ``>`` as written.
Timings are printed as ``TIME ...`` lines and never checked.

    python tutorial/run_chapters.py            # every chapter, in a temporary output directory
    python tutorial/run_chapters.py 03 05      # some chapters
    python tutorial/run_chapters.py --out DIR  # write the chapters' pictures into DIR
    python tutorial/run_chapters.py -v 05      # and show what the chapter printed

Pictures go to ``$MINADEPT_TUTORIAL_OUT`` (the chapters' code reads it; default: the current
directory). ``make_figures.py`` runs the picture-making chapters with it set to ``tutorial/``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_VAR = "MINADEPT_TUTORIAL_OUT"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_STATED = re.compile(rf"^RESULT (\w+) ([=<>]) ({_NUM})(?:\s*±\s*({_NUM}))?\s*$", re.M)
_PRINTED = re.compile(rf"^RESULT (\w+) = ({_NUM})\s*$", re.M)


def chapters() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]-*.md"))


def code_blocks(text: str) -> list[str]:
    """The ```python blocks of a chapter, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def stated_results(text: str) -> dict[str, tuple[str, float, float | None]]:
    """``RESULT`` lines of the chapter's text outside its python blocks: name -> (op, value, tol)."""
    prose = re.sub(r"^```python\n.*?^```", "", text, flags=re.S | re.M)
    return {m[1]: (m[2], float(m[3]), None if m[4] is None else float(m[4])) for m in _STATED.finditer(prose)}


def printed_results(stdout: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in _PRINTED.finditer(stdout)}


def mismatches(stated: dict, printed: dict) -> list[str]:
    """Every stated result that was not printed or does not hold."""
    bad = []
    for name, (op, value, tol) in stated.items():
        if name not in printed:
            bad.append(f"{name}: stated but never printed")
            continue
        got = printed[name]
        if op == "=":
            limit = tol if tol is not None else max(0.02 * abs(value), 1e-6)
            ok = abs(got - value) <= limit
            want = f"{value} ± {limit:g}"
        else:
            ok = got < value if op == "<" else got > value
            want = f"{op} {value}"
        if not ok:
            bad.append(f"{name}: the chapter states {want}, the code printed {got}")
    return bad


def _child(path: str) -> int:
    """Paste the chapter's blocks into an interactive console; exit 1 at the first failing block."""
    import code

    class Console(code.InteractiveConsole):
        failed = False

        def showtraceback(self):
            Console.failed = True
            super().showtraceback()

        def showsyntaxerror(self, filename=None, **kw):
            Console.failed = True
            super().showsyntaxerror(filename, **kw)

    console = Console(filename="<stdin>")
    for i, block in enumerate(code_blocks(Path(path).read_text(encoding="utf-8")), start=1):
        more = False
        for line in block.splitlines():
            more = console.push(line)
            if Console.failed:
                break
        if more and not Console.failed:
            console.push("")                # the blank line that ends a compound statement
        sys.stdout.flush()
        if Console.failed:
            print(f"\nchapter {Path(path).name}: code block {i} failed", file=sys.stderr)
            return 1
    return 0


def run_chapter(path: Path, out_dir: Path, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str, float]:
    """Run one chapter in a fresh interpreter; returns (status, stdout, stderr, seconds)."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env[OUT_VAR] = str(out_dir)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)], cwd=cwd or out_dir,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def check_chapter(path: Path, out_dir: Path, cwd: Path | None = None) -> tuple[list[str], float, str]:
    """Run and check one chapter: (problems, seconds, stdout)."""
    text = path.read_text(encoding="utf-8")
    status, out, err, secs = run_chapter(path, out_dir, cwd)
    problems = [] if status == 0 else [f"a code block failed:\n{err[-3000:]}"]
    stated = stated_results(text)
    if not stated:
        problems.append("the chapter states no RESULT")
    if status == 0:
        problems += mismatches(stated, printed_results(out))
    return problems, secs, out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return _child(argv[1])
    out, verbose = None, "-v" in argv
    argv = [a for a in argv if a != "-v"]
    if argv[:1] == ["--out"]:
        out, argv = Path(argv[1]).resolve(), argv[2:]
        out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in chapters() if not argv or any(c.name.startswith(a) for a in argv)]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for c in todo:
            problems, secs, stdout = check_chapter(c, out or Path(tmp))
            if verbose:
                print(stdout)
            failed += report(c, problems, secs)
    return 1 if failed else 0


def report(chapter: Path, problems: list, secs: float) -> bool:
    """Print a chapter's line (and its problems); True if it failed."""
    print(f"{chapter.name:40s} {secs:6.1f} s  {'ok' if not problems else 'FAILED'}")
    for p in problems:
        print("   ", p)
    return bool(problems)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
