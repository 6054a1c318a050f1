"""After a plain (non-editable) ``pip install .``, Python started in the repository root must use
the installed package: the source tree must not shadow it with a package that lacks the packaged
weights (``minadept.weights``) or the compiled kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed as ``pip install .`` would (no extension, no dependencies) into a
    folder of its own; returns that folder."""
    target = tmp_path_factory.mktemp("site")
    env = dict(os.environ, MINADEPT_NO_EXT="1", PIP_NO_INDEX="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0:
        pytest.fail(f"pip install failed:\n{r.stderr[-2000:]}")
    return target


def _run_in_root(code: str, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), MINADEPT_BACKEND="auto")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_repository_root_imports_the_installed_package(installed):
    r = _run_in_root("import minadept, minadept.weights; from minadept import Model; m = Model.load(); "
                     "print(minadept.__file__); print(m.config.n_layer)", installed)
    assert r.returncode == 0, r.stderr
    where, n_layer = r.stdout.split()
    assert Path(where).is_relative_to(installed), f"imported {where}, not the installed package"
    assert n_layer == "12"


def test_readme_api_snippet_runs_from_the_repository_root(installed):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = _run_in_root(code, installed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the snippet printed nothing"
