"""The embedded default model (``minigpt2-stories/``), shipped as package data of ``minadept.weights``.

``train.py`` in this folder is the training script (not imported by the runtime)."""
