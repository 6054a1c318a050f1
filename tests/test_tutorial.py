"""The tutorial's Python snippets run, in order, on the embedded model (a tutorial that does not
run teaches the wrong thing)."""
import re
from pathlib import Path

import numpy as np

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorial" / "README.md"


def test_tutorial_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"tutorial block {i + 1}", "exec"), ns)
    # step 2's hand-written forward equals the engine's logits
    from minadept import Engine
    ref = Engine(ns["m"]).forward(ns["ids"], Engine(ns["m"]).new_cache()).logits[-1]
    assert np.abs(ns["logits"][-1] - ref).max() < 1e-4
    assert np.abs(ns["kv"] - ns["propagate_kv_loop"](ns["m"], ns["h4"], 4)).max() < 1e-5
    # step 7's fused block equals the NumPy block (when the extension is built)
    if ns["plan"] is not None:
        assert np.abs(ns["x_fused"] - ns["x_numpy"]).max() < 1e-4
