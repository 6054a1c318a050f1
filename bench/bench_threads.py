"""One BLAS/OpenMP thread against all cores, in one process on the same prompt, alternating rounds:
prefill and greedy decode speed of the embedded model and of GPT-2 124M shapes (random weights).
It chose the CLI's default thread count (``backend.default_threads``).

    python bench/bench_threads.py [--rounds 5] [--prompt-tokens 128] [--new-tokens 32] [--busy]

``--busy`` runs a busy-looping process beside the benchmark (a machine doing other work).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from minadept import Engine, Model, backend  # noqa: E402
from minadept.generate import generate  # noqa: E402
from minadept.sampling import SamplingSettings  # noqa: E402


def _spin():
    while True:
        pass


def run(engine, ids, new_tokens):
    """(prefill tokens/s, decode tokens/s) of one greedy generation."""
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _ in generate(engine, ids, max_new_tokens=new_tokens, sampling=SamplingSettings(temperature=0),
                      rng=np.random.default_rng(0)):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
    t_end = time.perf_counter()
    return len(ids) / (t_first - t0), (n - 1) / (t_end - t_first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--skip-124m", action="store_true")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spinner = None
    if a.busy:
        spinner = mp.Process(target=_spin, daemon=True)
        spinner.start()
    models = [("embedded", Model.load())]
    if not a.skip_124m:
        from randmodel import random_model
        models.append(("gpt2-124M shapes", random_model(n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
                                                        n_positions=1024, seed=0, scale=0.02)))
    print(f"backend {backend.active()}, {cores} cores, busy neighbour: {a.busy}, {a.rounds} alternating rounds")
    for name, model in models:
        ids = list(np.random.default_rng(1).integers(0, model.config.vocab_size, a.prompt_tokens))
        engine = Engine(model)
        engine.prepare()
        res = {1: [], cores: []}
        for _ in range(a.rounds):
            for n in (1, cores):
                with threadpool_limits(limits=n):
                    res[n].append(run(engine, ids, a.new_tokens))
        mb = 4 * model.n_params / 2**20
        for i, what in enumerate(("prefill", "decode")):
            one = statistics.median(r[i] for r in res[1])
            many = statistics.median(r[i] for r in res[cores])
            print(f"{name:<18} {mb:7.0f} MB  {what:<8} 1 thread {one:8.1f} tok/s   {cores} threads {many:8.1f} tok/s"
                  f"   {cores} / 1 = {many / one:.2f}x")
    if spinner is not None:
        spinner.terminate()


if __name__ == "__main__":
    main()
