"""Command line: ``minadept generate | eval | calibrate | dump | check | probe-train | classify | info``
(also ``python -m minadept``).

Errors are one line on stderr (``error: ...``) and exit status 2 (bad usage) or 1 (bad input).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import MinadeptError


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)    # subcommands too: no silent prefixes of flags
        super().__init__(*a, **kw)

    def error(self, message):  # one line, no usage dump
        raise MinadeptError(f"{self.prog}: {message}")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seed(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _add_dtype(p):
    from .halfprec import DTYPES
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights: float32 (default), or float16 / bfloat16: the blocks' matrices and the LM head "
                        "rounded to it and held so on the fast backend (computed in float32 on the NumPy backend)")


def _add_model(p):
    p.add_argument("--model", default=None,
                   help="model directory or Hugging Face id (default: the embedded minigpt2-stories)")
    _add_dtype(p)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads (default: 1 for models up to 64 MB of weights, all cores above)")


def _add_policy(p):
    g = p.add_argument_group("early exit (ADEPT engine)")
    g.add_argument("--exit", default="none",
                   help="exit policy: none (full depth, the default), fixed, confidence, margin, saturation, adept")
    g.add_argument("--threshold", type=_float, default=None,
                   help="exit when score > threshold, in [0, 1]; 1 never exits (default: " + _default_thresholds() + ")")
    g.add_argument("--exit-layer", type=int, default=None, help="K for --exit fixed (1..n_layer)")
    g.add_argument("--min-exit-layer", type=int, default=None, help="first layer that may exit (default 1)")
    g.add_argument("--schedule", default="constant", help="threshold schedule: constant (default) or decay (CALM)")
    g.add_argument("--kv", default="propagate",
                   help="skipped-layer KV: propagate (default), propagate-loop (its per-layer twin, identity K/V map), oracle")
    g.add_argument("--kv-fill", default="eager", help="eager (default) or lazy (lazy only with --kv propagate)")
    g.add_argument("--adept", default=None,
                   help="calibrated policy file or its directory (default: adept.safetensors in the model directory)")
    g.add_argument("--exit-map", default=None, help="{learned,identity} with --exit adept (default learned)")
    g.add_argument("--kv-map", default=None, help="{learned,identity} with --exit adept (default learned)")


def _default_thresholds() -> str:
    from .exits.policies import THRESHOLD_DEFAULTS
    return ", ".join(f"{k} {v}" for k, v in THRESHOLD_DEFAULTS.items()) + ", adept its calibrated value"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minadept", description="NumPy GPT-2 with ADEPT token-level early exit.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("generate", help="stream a completion of PROMPT")
    g.add_argument("prompt", help="prompt text, or - to read stdin")
    _add_model(g)
    g.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    g.add_argument("--temperature", type=_float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the K most likely (default 40)")
    g.add_argument("--top-p", type=_float, default=1.0, help="nucleus mass in (0, 1] (default 1 = off)")
    g.add_argument("--seed", type=_seed, default=None, help="sampling seed >= 0 (default: random)")
    g.add_argument("--json", action="store_true", help="last stderr line is a JSON summary")
    g.add_argument("--compare", action="store_true",
                   help="then run full depth on the same prompt (same number of tokens, not printed) and "
                        "report both speeds and their ratio")
    g.add_argument("--show-exits", nargs="?", const="auto", default=None, choices=["tags", "color", "auto"],
                   help="mark each token with its exit layer: tags (token[k]) or color (with a legend on "
                        "stderr); alone: color on a terminal, tags otherwise")
    _add_policy(g)

    e = sub.add_parser("eval", help="perplexity (and early-exit quality/compute) on a text file")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    _add_model(e)
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    e.add_argument("--chunk-bytes", type=int, default=None,
                   help="bits-per-byte protocol: score documents (split at <|endoftext|>) in chunks of at most "
                        "N bytes cut at line ends, each after <|endoftext|> alone; reports bits_per_byte")
    e.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    e.add_argument("--sweep", action="store_true", help="sweep thresholds of every training-free policy")
    e.add_argument("--plot", default=None, help="with --sweep: write quality vs compute to this PNG")
    _add_policy(e)

    d = sub.add_parser("dump", help="write a reference .npz (see README: dump format)")
    _add_model(d)
    d.add_argument("--prompt", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--engine", default="minadept", choices=["minadept", "transformers"],
                   help="minadept (default) or transformers (full depth, needs the oracle extra; for minadept check)")
    _add_policy(d)

    k = sub.add_parser("check", help="compare a candidate dump with a reference dump; say where they part")
    k.add_argument("ref", metavar="REF.npz", help="reference dump")
    k.add_argument("cand", metavar="CANDIDATE.npz", help="dump of the implementation under test")
    k.add_argument("--atol", type=_float, default=None, help="absolute tolerance per token (default 1e-05)")
    k.add_argument("--rtol", type=_float, default=None,
                   help="tolerance relative to the token's largest reference entry (default 1e-04)")
    k.add_argument("--json", action="store_true", help="print a JSON object instead of the table")

    c = sub.add_parser("calibrate", help="fit ADEPT's mappers and exit policy on a text file")
    c.add_argument("--text", required=True, help="UTF-8 calibration text (keep it apart from evaluation text)")
    _add_model(c)
    c.add_argument("--cost-weight", type=_float, default=1.0,
                   help="W = beta/lambda: nats of quality traded per unit of depth fraction (default 1)")
    c.add_argument("--max-tokens", type=int, default=98304, help="calibration tokens (default 98304)")
    c.add_argument("--seed", type=_seed, default=0, help="window sampling seed (default 0)")
    c.add_argument("--target-ppl-increase", type=_float, default=0.05,
                   help="default threshold: cheapest with held-out ppl within this of full depth (0.05)")
    c.add_argument("--kv-rank", type=int, default=24, help="rank of each K/V mapper (default 24)")
    c.add_argument("--out", default=None,
                   help="output directory (created if missing) or .safetensors file name (default: the model "
                        "directory, unless the model ships inside the package)")
    c.add_argument("--force", action="store_true", help="overwrite an existing calibration at the output")

    i = sub.add_parser("info", help="version, default model, BLAS, backend")
    i.add_argument("--model", default=None)
    _add_dtype(i)

    t = sub.add_parser("probe-train", help="fit a linear probe per layer on a text<TAB>label file (classify)")
    t.add_argument("--data", required=True, help="UTF-8 TSV with the header text<TAB>label")
    t.add_argument("--out", required=True, help="output directory for probes.safetensors and probes.json")
    _add_model(t)
    t.add_argument("--pool", default="auto", choices=["auto", "mean", "last"],
                   help="features: mean over tokens, last token, or auto (both fitted, the better kept)")
    t.add_argument("--holdout", type=_float, default=0.2, help="held-out share for L2 and thresholds (0.2)")
    t.add_argument("--seed", type=_seed, default=0, help="held-out split seed (default 0)")
    t.add_argument("--max-examples", type=int, default=None, help="use a seeded sample of N examples")
    t.add_argument("--force", action="store_true", help="overwrite existing probes in --out")
    t.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    _add_policy(t)
    t.set_defaults(exit=None, kv=None, kv_fill=None, schedule=None)

    q = sub.add_parser("classify", help="classify texts with per-layer probes, stopping each input early")
    q.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (or --data)")
    q.add_argument("--data", default=None, help="UTF-8 TSV with the header text<TAB>label (or text)")
    q.add_argument("--probes", default=None, help="probe directory or file (default: the model's sentiment/)")
    q.add_argument("--stop", default="full",
                   help="full (default), layer:K, max-prob[:T], entropy[:T], patience[:P]; no value: the probes' calibrated one")
    _add_model(q)
    q.add_argument("--compare", action="store_true", help="also time full depth (interleaved text by text) and report the speed-up")
    q.add_argument("--rounds", type=int, default=3, help="rounds over the texts with --compare (default 3)")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    _add_policy(q)
    q.set_defaults(exit=None, kv=None, kv_fill=None, schedule=None)
    return p


def _check_threads(n):
    from .backend import available_cores
    if n is not None and not 1 <= n <= available_cores():
        raise MinadeptError(f"--threads must be in [1, {available_cores()}] (the cores available), got {n}")


def set_threads(args, model) -> int:
    """Apply ``--threads``, or the default for the model's size (``backend.default_threads``),
    to BLAS and OpenMP until the command ends; returns the thread count that runs."""
    from threadpoolctl import threadpool_limits

    from . import backend
    n = args.threads if args.threads is not None else backend.default_threads(4 * model.n_params)
    args.thread_limits = threadpool_limits(limits=n)
    return n


def _settings(args):
    """The ``EngineSettings`` of the policy flags, checked before anything is loaded."""
    from .settings import EngineSettings
    horizon = getattr(args, "max_new_tokens", None) or 128
    st = EngineSettings.from_args(args, horizon=horizon)
    st.check(sweep=getattr(args, "sweep", False))
    return st


def _engine(args, model):
    from .settings import build_engine
    return build_engine(model, _settings(args))


# ----------------------------------------------------------------------------- generate

_COLOURS = [46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196, 160]


def _colour(layer: int, n_layer: int) -> int:
    return _COLOURS[min(len(_COLOURS) - 1, (layer - 1) * len(_COLOURS) // n_layer)]


def _mark(piece: str, layers: list[int], n_layer: int, mode: str) -> str:
    """``piece`` marked with the exit layers of the tokens that produced it: ``piece[k]`` (tags)
    or coloured by the deepest of them (color)."""
    if mode == "tags":
        return f"{piece}[{','.join(map(str, layers))}]"
    return f"\x1b[38;5;{_colour(max(layers), n_layer)}m{piece}\x1b[0m"


def _legend(n_layer: int) -> str:
    """One stderr line mapping colours to exit layers (for ``--show-exits color``)."""
    keys = " ".join(f"\x1b[38;5;{_colour(k, n_layer)}m{k}\x1b[0m" for k in range(1, n_layer + 1))
    return f"exit layer: {keys} (full depth = {n_layer})"


_STOPS = {"eot": "stopped at <|endoftext|>", "max_new_tokens": "reached --max-new-tokens",
          "context_full": "context full", "interrupted": "interrupted"}


def cmd_generate(args) -> int:
    import numpy as np

    from .generate import Generation, generate
    from .model import Model
    from .sampling import SamplingSettings

    sampling = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 0:
        raise MinadeptError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    _settings(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = Model.load(args.model, dtype=args.dtype)
    threads = set_threads(args, model)
    engine = _engine(args, model)
    tok = model.tokenizer
    ids = tok.encode(prompt)
    state = Generation(prompt_ids=ids)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
    rng = np.random.default_rng(seed)          # the seed is reported: any run can be repeated
    out = sys.stdout
    mode = args.show_exits
    if mode == "auto":
        mode = "color" if out.isatty() else "tags"
    L = model.config.n_layer
    if mode == "color":
        print(_legend(L), file=sys.stderr)
    stream = tok.stream()
    pending: list[int] = []
    t_start = time.perf_counter()
    engine.prepare()                          # one-time set-up, kept out of the prefill figure
    t0 = time.perf_counter()
    t_prefill = t_first = t1 = None
    try:
        for step in generate(engine, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng,
                             eot_id=tok.eot_id, state=state):
            if t_prefill is None:
                t1 = time.perf_counter()
                t_prefill, t_first = t1 - t0, t1 - t_start
            if step.token == tok.eot_id:            # the stop token ends the text; it is not printed
                state.stop_reason = "eot"
                break
            pending.append(int(step.result.exit_layers[-1]))
            piece = stream.step(step.token)
            if piece:
                out.write(_mark(piece, pending, L, mode) if mode else piece)
                out.flush()
                pending = []
    except KeyboardInterrupt:
        state.stop_reason = "interrupted"
    t_decode = time.perf_counter() - t1 if t1 is not None else 0.0
    rest = stream.finish()
    if rest or pending:
        out.write(_mark(rest, pending, L, mode) if mode and pending else rest)
    out.write("\n")                              # the summary and any error start on a new line
    out.flush()
    if state.stop_reason == "context_full":
        print(f"stopped: the context is full ({model.config.n_positions} tokens, n_positions)", file=sys.stderr)
    times = dict(prefill=t_prefill, first=t_first, decode=t_decode, threads=threads)
    if args.compare and state.stop_reason != "interrupted" and state.prompt_result is not None:
        times["full_depth"] = _full_depth_times(model, state, sampling, seed)
    _summary(args, engine, state, times,
             dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=seed))
    if state.stop_reason == "interrupted":
        raise KeyboardInterrupt
    return 0


def _full_depth_times(model, state, sampling, seed) -> dict:
    """Full depth on the same prompt for as many decode steps as the run made (no stop token),
    timed as the run was: {prefill_s, decode_s, decode_steps}."""
    import numpy as np

    from .engine import Engine
    from .generate import generate
    engine = Engine(model)
    engine.prepare()
    n = len(state.decode_results) + 1
    t0 = time.perf_counter()
    t1 = None
    for _ in generate(engine, state.prompt_ids, max_new_tokens=n, sampling=sampling,
                      rng=np.random.default_rng(seed)):
        if t1 is None:
            t1 = time.perf_counter()
    return dict(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, decode_steps=n - 1)


def _comparison(s: dict, full: dict) -> dict:
    """The full-depth speeds and this run's speed-ups over them (None where undefined)."""
    pre = round(s["prompt_tokens"] / full["prefill_s"], 2) if full["prefill_s"] > 0 else None
    dec = round(full["decode_steps"] / full["decode_s"], 2) if full["decode_steps"] and full["decode_s"] > 0 else None
    ratio = lambda a, b: round(a / b, 3) if a and b else None
    return {"full_depth_prefill_tokens_per_s": pre, "full_depth_decode_tokens_per_s": dec,
            "prefill_speedup": ratio(s["prefill_tokens_per_s"], pre),
            "decode_speedup": ratio(s["decode_tokens_per_s"], dec)}


def _summary(args, engine, state, t, sampling):
    results = ([state.prompt_result] if state.prompt_result else []) + state.decode_results
    n_decode = len(state.decode_results)
    exit_layers = [int(r.exit_layers[-1]) for r in results]
    total = sum(r.total_flops for r in results)
    full = sum(r.full_flops for r in results)
    s = {
        "prompt_tokens": len(state.prompt_ids),
        "new_tokens": len(state.tokens),
        "prefill_tokens_per_s": round(len(state.prompt_ids) / t["prefill"], 2) if t["prefill"] else None,
        "time_to_first_token_s": round(t["first"], 4) if t["first"] is not None else None,
        "decode_tokens_per_s": round(n_decode / t["decode"], 2) if n_decode and t["decode"] > 0 else None,
        "stop_reason": state.stop_reason,
        "threads": t["threads"],
        "mean_exit_layer": round(sum(exit_layers) / len(exit_layers), 3) if exit_layers else None,
        "compute_fraction": round(total / full, 4) if full else None,
        "exit_layers": exit_layers,
    }
    if state.prompt_result is not None:
        s["prompt_exit_layers"] = [int(x) for x in state.prompt_result.exit_layers]
    s.update(engine.settings(), **sampling)
    s.update(engine.model.dtype_info())
    if "full_depth" in t:
        s.update(_comparison(s, t["full_depth"]))
    if args.json:
        print(json.dumps(s), file=sys.stderr)
        return
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")
    line = (f"prompt tokens {s['prompt_tokens']}, new tokens {s['new_tokens']}, "
            f"prefill {fmt(s['prefill_tokens_per_s'])} tokens/s, decode {fmt(s['decode_tokens_per_s'])} tokens/s, "
            f"{plural(s['threads'], 'thread')}")
    if args.exit != "none" and exit_layers:
        line += f", mean exit layer {s['mean_exit_layer']:.2f}, compute {s['compute_fraction']:.3f} of full depth"
    if state.stop_reason in ("eot", "interrupted"):
        line += f"; {_STOPS[state.stop_reason]}"
    if engine.model.dtype != "float32":
        line += f"; {engine.model.describe_dtype()}"
    print(line, file=sys.stderr)
    if "full_depth" in t:
        x = lambda v: "n/a" if v is None else f"{v:.2f}x"
        print(f"full depth on the same prompt: prefill {fmt(s['full_depth_prefill_tokens_per_s'])} tokens/s, "
              f"decode {fmt(s['full_depth_decode_tokens_per_s'])} tokens/s; this run: prefill "
              f"{x(s['prefill_speedup'])}, decode {x(s['decode_speedup'])} (one run each)", file=sys.stderr)


# ----------------------------------------------------------------------------- other commands

def cmd_info(args) -> int:
    from threadpoolctl import threadpool_info

    from . import __version__, backend, halfprec
    from .checkpoint import default_model_dir
    print(f"minadept {__version__}")
    d = default_model_dir()
    print(f"default model: {d}{'' if (d / 'config.json').is_file() else ' (missing)'}")
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            print(f"blas: {pool.get('internal_api')} {pool.get('version')} ({pool.get('filepath')}), "
                  f"threads {pool.get('num_threads')}")
    print(f"backend: {backend.active()}")
    print(f"half precision: float16 conversion {backend.half_conversion()}, bfloat16 by a 16-bit shift; "
          f"--dtype {args.dtype}: {halfprec.describe(args.dtype, backend.kernels() is not None)}")
    print(f"threads: generate/eval/dump/calibrate default to 1 for models up to "
          f"{backend.SMALL_MODEL_BYTES >> 20} MB of weights, {backend.available_cores()} (all cores) above; "
          f"--threads N sets them")
    return 0


def cmd_dump(args) -> int:
    from .dump import write_dump
    from .model import Model
    _settings(args)
    check_writable(args.out, "--out")
    if args.engine == "transformers":
        return _dump_transformers(args)
    model = Model.load(args.model, dtype=args.dtype)
    set_threads(args, model)
    engine = _engine(args, model)
    write_dump(engine, args.prompt, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _dump_transformers(args) -> int:
    """``dump --engine transformers``: full depth, so any early-exit flag is an error."""
    from .dump_hf import write_dump_transformers
    defaults = dict(exit="none", threshold=None, exit_layer=None, min_exit_layer=None, schedule="constant",
                    kv="propagate", kv_fill="eager", adept=None, exit_map=None, kv_map=None, dtype="float32")
    for flag, default in defaults.items():
        if getattr(args, flag) != default:
            why = "it runs transformers in float32" if flag == "dtype" else "it runs full depth"
            raise MinadeptError(f"--{flag.replace('_', '-')} has no effect with --engine transformers ({why})")
    write_dump_transformers(args.model, args.prompt, args.out, threads=args.threads)
    print(f"wrote {args.out} (transformers, full depth)", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    """``check``: 0 within tolerance, 1 not, 2 unusable input (one line on stderr)."""
    from .check import DEFAULT_ATOL, DEFAULT_RTOL, CheckInputError, run_check
    try:
        return run_check(args.ref, args.cand, atol=DEFAULT_ATOL if args.atol is None else args.atol,
                         rtol=DEFAULT_RTOL if args.rtol is None else args.rtol, as_json=args.json)
    except CheckInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_eval(args) -> int:
    """``minadept eval``: one setting, or ``--sweep``. Prints a summary or a table; ``--json``
    puts a JSON object on the last stdout line."""
    from .evaluate import check_plot_output
    from .model import Model
    settings = _settings(args)
    if args.plot and not args.sweep:
        raise MinadeptError("--plot needs --sweep")
    if args.plot:
        check_plot_output(args.plot)
    model = Model.load(args.model, dtype=args.dtype)
    set_threads(args, model)
    data, n_bytes = _eval_data(args, model)
    return (_eval_sweep if args.sweep else _eval_one)(args, settings, model, data, n_bytes)


def _eval_data(args, model):
    """(what to score, its UTF-8 bytes or None): the token stream of the perplexity protocol, or
    with ``--chunk-bytes`` the windows of the bits-per-byte protocol."""
    from .evaluate import byte_chunks, chunk_windows, read_text, read_token_stream
    if args.chunk_bytes is None:
        return read_token_stream(model.tokenizer, args.text, args.max_tokens), None
    if args.chunk_bytes < 16:
        raise MinadeptError(f"--chunk-bytes must be >= 16, got {args.chunk_bytes}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MinadeptError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    chunks = byte_chunks(read_text(args.text), args.chunk_bytes)
    return chunk_windows(model.tokenizer, chunks, model.config.n_positions, args.max_tokens)


def _eval_one(args, settings, model, ids, n_bytes) -> int:
    from tqdm import tqdm

    from .engine import Engine
    from .evaluate import bits_per_byte, evaluate, full_depth_pass
    from .settings import build_engine
    engine = build_engine(model, settings)
    policy_run = settings.exit != "none"
    n_scored = sum(len(w) - 1 for w in ids) if isinstance(ids, list) else len(ids) - 1
    # progress over tokens (both passes for a policy run); disable=None: only on a terminal
    with tqdm(total=n_scored * (2 if policy_run else 1), unit="tok", leave=False, disable=None,
              file=sys.stderr, desc="full depth" if policy_run else "eval") as bar:
        if policy_run:
            base, ref = full_depth_pass(Engine(model), ids, progress=bar)
            bar.set_description(settings.exit)
            res = evaluate(engine, ids, ref, progress=bar)
        else:
            res = base = evaluate(engine, ids, None, progress=bar)
    res.setdefault("agreement", 1.0)
    res["full_depth_ppl"] = base["ppl"]
    if n_bytes is not None:
        res.update(bytes=n_bytes, bits_per_byte=bits_per_byte(res, n_bytes),
                   full_depth_bits_per_byte=bits_per_byte(base, n_bytes))
    res.update(engine.settings())
    res.update(model.dtype_info())
    if args.json:
        print(json.dumps(res))
        return 0
    if model.dtype != "float32":
        print(model.describe_dtype())
    n = res["tokens"]
    print(f"perplexity {res['ppl']:.3f} over {n} token{'' if n == 1 else 's'} (nll {res['nll']:.4f} nats/token)")
    if n_bytes is not None:
        print(f"bits per byte {res['bits_per_byte']:.4f} over {n_bytes} bytes"
              + (f" (full depth {res['full_depth_bits_per_byte']:.4f})" if policy_run else ""))
    if policy_run:
        print(f"full-depth perplexity {base['ppl']:.3f} (baseline, same tokens; this policy "
              f"{res['ppl'] / base['ppl'] - 1:+.2%})")
        print(f"agreement {res['agreement']:.4f} (share of positions whose top-1 token equals "
              f"full depth's), mean exit layer {res['mean_exit_layer']:.2f} of {model.config.n_layer}, "
              f"compute fraction {res['compute_fraction']:.4f} (FLOPs / full depth's)")
    return 0


def _eval_sweep(args, settings, model, ids, n_bytes) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from .engine import Engine
    from .evaluate import (SWEEP_HEADER, bits_per_byte, evaluate, format_row, full_depth_pass, plot_sweep,
                           sweep_settings)
    from .exits.adept import ADEPT_FILE, load_adept
    from .settings import build_engine
    shipped = (model.path / ADEPT_FILE).is_file()
    adept = load_adept(settings.adept or model.path, model.config) if settings.adept or shipped else None
    points = sweep_settings(model.config.n_layer, adept=adept is not None)
    if model.dtype != "float32":
        print(model.describe_dtype())
    print(SWEEP_HEADER)
    # progress over sweep points; disable=None: only on a terminal
    bar = tqdm(points, unit="pt", leave=False, disable=None, file=sys.stderr, desc="sweep")
    rows, ref = [], None
    for name, kw in bar:
        if name == "none":       # full depth is the reference: one pass gives its row and the top-1s
            res, ref = full_depth_pass(Engine(model), ids)
        else:
            res = evaluate(build_engine(model, settings.with_(exit=name, adept=None, **kw), adept=adept), ids, ref)
        if n_bytes is not None:
            res.update(bytes=n_bytes, bits_per_byte=bits_per_byte(res, n_bytes))
        res["exit"] = name
        res["setting"] = ",".join(f"{k}={v}" for k, v in kw.items()).replace("threshold=", "tau=")
        rows.append(res)
        bar.write(format_row(res), file=sys.stdout)
        sys.stdout.flush()
    bar.close()
    if args.plot:
        n = rows[0]["tokens"]
        plot_sweep(rows, args.plot, title=f"{model.path.name}: {Path(args.text).name}, {n} scored tokens")
    if args.json:
        print(json.dumps({"sweep": rows, **model.dtype_info()}))
    return 0


def cmd_calibrate(args) -> int:
    from safetensors import SafetensorError
    from tqdm import tqdm

    from .evaluate import read_token_stream
    from .exits.adept import save_adept
    from .exits.calibrate import calibrate, check_settings, check_text_length
    from .model import Model
    if args.kv_rank < 1:
        raise MinadeptError(f"--kv-rank must be >= 1, got {args.kv_rank}")
    model = Model.load(args.model, dtype=args.dtype)
    set_threads(args, model)
    check_settings(model.config, cost_weight=args.cost_weight, max_tokens=args.max_tokens,
                   target_ppl_increase=args.target_ppl_increase, kv_rank=args.kv_rank)
    ids = read_token_stream(model.tokenizer, args.text)
    out, to_create = _calibrate_output(args.out, model.path, args.force)
    check_text_length(model.config, len(ids))
    created = None
    if to_create is not None:
        created = next(p for p in [to_create, *to_create.parents] if p.parent.exists())
        try:
            to_create.mkdir(parents=True)
        except OSError as e:
            raise MinadeptError(f"cannot create --out directory {to_create}: {e.strerror or e}") from None
    bar = lambda total, desc: tqdm(total=total, desc=desc, unit="tau" if "threshold" in desc else "tok",
                                   file=sys.stderr, leave=False)
    try:
        params = calibrate(model, ids, cost_weight=args.cost_weight, seed=args.seed,
                           max_tokens=args.max_tokens, target_ppl_increase=args.target_ppl_increase,
                           kv_rank=args.kv_rank, progress_factory=bar)
    except BaseException:
        if created is not None:                   # leave no empty directory behind
            import shutil
            shutil.rmtree(created, ignore_errors=True)
        raise
    try:
        save_adept(params, out)
        out.with_suffix(".json").write_text(json.dumps(params.info, indent=1, sort_keys=True) + "\n")
    except (OSError, SafetensorError) as e:
        raise MinadeptError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}") from None
    rows = {r["tau"]: r for r in params.info["threshold_search"]["rows"]}
    best = rows[params.threshold]
    print(f"wrote {out} ({params.n_params:,} parameters, {params.n_params / model.n_params:.1%} "
          f"of the model's) and {out.with_suffix('.json').name}", file=sys.stderr)
    print(f"default threshold {params.threshold}: held-out ppl {best['ppl_increase']:+.1%} vs full depth, "
          f"compute fraction {best['compute_fraction']:.3f}, mean exit layer {best['mean_exit_layer']:.2f}")
    if not params.info["target_met"]:
        short = params.info["calibration_tokens"] + params.info["heldout_tokens"] < args.max_tokens - 256
        more = "a longer text (it had fewer tokens than --max-tokens)" if short else "more text (raise --max-tokens)"
        print(f"warning: no threshold kept the held-out perplexity within +{args.target_ppl_increase:.1%}; "
              f"stored the most conservative one ({params.threshold}); calibrate on {more}",
              file=sys.stderr)
    return 0


def check_writable(path, flag: str) -> Path:
    """Check, before any long computation, that the file ``path`` (named by ``flag``) can be
    written: its folder exists, it is not a folder itself, and a file can be created beside it.
    Returns the Path. Raises MinadeptError naming the problem."""
    import tempfile
    from pathlib import Path
    out = Path(path)
    try:
        if out.is_dir():
            raise MinadeptError(f"{flag} is a directory, expected a file name: {out}")
        parent = out.parent
        if not parent.is_dir():
            raise MinadeptError(f"{flag}: output directory does not exist: {parent}")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".minadept-write-check-"):
            pass
    except OSError as e:
        raise MinadeptError(f"{flag}: cannot write {out}: {e.strerror or e}") from None
    return out


def _calibrate_output(out_arg, model_path, force: bool):
    """The adept.safetensors path for ``calibrate`` (``--out``: a .safetensors file name, or a
    directory, created when it does not exist), checked before the minutes-long calibration.
    Returns (path, directory to create or None): nothing is created here.

    Without ``--out`` the calibration goes beside the model, except for a model that lives in the
    installed package (its shipped calibration is not the user's to overwrite). An existing
    calibration is overwritten only with ``--force``. Raises MinadeptError."""
    from pathlib import Path

    from .checkpoint import packaged_weights_dir
    from .exits.adept import ADEPT_FILE
    created = None
    if out_arg is None:
        model_path = Path(model_path).resolve()
        if model_path.is_relative_to(packaged_weights_dir().resolve()):
            raise MinadeptError(f"the model {model_path.name} ships inside the minadept package, with its "
                                f"calibration: pass --out DIR to write yours elsewhere")
        out = model_path / ADEPT_FILE
    else:
        if not out_arg.strip():
            raise MinadeptError("--out is empty (give a directory or a .safetensors file name)")
        out = Path(out_arg).expanduser()
        try:
            if out.suffix == ".json":
                raise MinadeptError(f"--out must name a .safetensors file or a directory, got {out.name} "
                                    f"(the .json beside it is written too)")
            if not out.exists() and out.suffix not in ("", ".safetensors") and not out_arg.endswith(("/", os.sep)):
                raise MinadeptError(f"--out {out_arg!r} looks like a file name: give a .safetensors file name, "
                                    f"or a directory (end it with / to create one named so)")
            if out.is_dir() or out_arg.endswith(("/", os.sep)) or (not out.exists() and out.suffix != ".safetensors"):
                if not out.exists():
                    created = out
                    base = next(p for p in out.parents if p.exists())
                    if not base.is_dir():
                        raise MinadeptError(f"bad --out {out_arg!r}: {base} is a file, not a directory")
                    check_writable(base / ".minadept", "--out")
                    return out / ADEPT_FILE, created
                out = out / ADEPT_FILE
        except OSError as e:
            raise MinadeptError(f"bad --out {out_arg!r}: {e.strerror or e}") from None
    if out.suffix != ".safetensors":
        raise MinadeptError(f"--out must name a .safetensors file or a directory, got {out.name}")
    if out.name == "model.safetensors" or out.name.startswith("model-0"):
        raise MinadeptError(f"refusing to overwrite model weights: {out}")
    existing = [p for p in (out, out.with_suffix(".json")) if p.exists()]
    if existing and not force:
        raise MinadeptError(f"{existing[0]} already exists; pass --force to overwrite it")
    for p in (out, out.with_suffix(".json")):
        check_writable(p, "--out")
    return out, created


COMMANDS = {"generate": cmd_generate, "calibrate": cmd_calibrate, "info": cmd_info, "dump": cmd_dump, "eval": cmd_eval}
COMMANDS["check"] = cmd_check


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="text", leave=False, disable=None, file=sys.stderr)


def cmd_probe_train(args) -> int:
    """``minadept probe-train``: fit and write probes; prints a per-layer table (``--json``: one
    JSON object as the last stdout line)."""
    import numpy as np

    from .classify import PROBE_FILE, PROBE_JSON, _engine_settings, read_tsv, save_probes, train_probes
    from pathlib import Path

    from .model import Model
    from .settings import build_engine
    settings = _engine_settings(args)
    if not 0 < args.holdout < 1:
        raise MinadeptError(f"--holdout must be in (0, 1), got {args.holdout}")
    out = Path(args.out)
    if (out / PROBE_FILE).exists() and not args.force:
        raise MinadeptError(f"{out / PROBE_FILE} exists (use --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise MinadeptError(f"--out must be a directory, got the file {out}")
    texts, labels = read_tsv(args.data)
    if args.max_examples is not None:
        if args.max_examples < 10:
            raise MinadeptError(f"--max-examples must be >= 10, got {args.max_examples}")
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(texts))[:args.max_examples])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    model = Model.load(args.model, dtype=args.dtype)
    set_threads(args, model)
    engine = build_engine(model, settings)
    engine.prepare()
    bar = _progress(len(texts), "features")
    probes = train_probes(model, engine, settings.as_dict(), texts, labels, pooling=args.pool,
                          holdout=args.holdout, seed=args.seed, progress=bar.update)
    bar.close()
    save_probes(probes, out)
    info = probes.info
    if args.json:
        print(json.dumps(dict(out=str(out), labels=probes.labels, pooling=probes.pooling, exit=settings.as_dict(), **info)))
        return 0
    print(f"{len(texts)} examples ({info['n_fit']} fit, {info['n_heldout']} held out), labels {', '.join(probes.labels)}; "
          f"{info['truncated']} truncated to the context")
    accs = info["heldout_acc"]
    print("layer  " + "  ".join(f"{m:>6}" for m in accs) + "   l2")
    for l in range(probes.n_layer):
        print(f"{l + 1:5d}  " + "  ".join(f"{accs[m][l]:6.2f}" for m in accs) + f"   {info['l2'][l]:g}")
    print(f"pooling: {probes.pooling} (held-out mean accuracy over layers: "
          + ", ".join(f"{m} {a:.2f}" for m, a in info["heldout_mean_acc"].items()) + ")")
    print("thresholds (held out, drop <= 1 point): "
          + ", ".join(f"{k} {v if v is not None else '-'}" for k, v in info["thresholds"].items()))
    print(f"wrote {out / PROBE_FILE} and {out / PROBE_JSON}")
    return 0


def cmd_classify(args) -> int:
    """``minadept classify``: predictions, accuracy (labels given), mean stop layer, compute
    fraction, texts/s; ``--compare`` also times full depth, interleaved text by text, ``--rounds`` times."""
    import warnings

    import numpy as np

    from .classify import (DEFAULT_PROBES, PROBE_FILE, _engine_settings, classify_ids, encode, full_depth_ids,
                           label_indices, load_probes, parse_rule, read_tsv, resolve_rule)
    from .model import Model
    from .settings import EngineSettings, build_engine
    if bool(args.texts) == bool(args.data):
        raise MinadeptError("give TEXT... or --data FILE (one of them)")
    rule = parse_rule(args.stop)
    if args.data:
        texts, labels = read_tsv(args.data, need_labels=False)
    else:
        texts, labels = list(args.texts), None
        for t in texts:
            if not t.strip():
                raise MinadeptError("empty text: nothing to classify")
    model = Model.load(args.model, dtype=args.dtype)
    if args.probes is None:
        if model.path is None or not (model.path / DEFAULT_PROBES / PROBE_FILE).exists():
            raise MinadeptError("no --probes given and the model ships none (train some with minadept probe-train)")
        args.probes = str(model.path / DEFAULT_PROBES)
    probes = load_probes(args.probes, model)
    rule = resolve_rule(parse_rule(args.stop, model.config.n_layer), probes)
    y = label_indices(labels, probes.labels) if labels is not None else None
    settings = _engine_settings(args, probes)
    n_threads = set_threads(args, model)
    engine = build_engine(model, settings)
    engine.prepare()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [encode(model.tokenizer, t, model.config.n_positions) for t in texts]
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    full_engine = build_engine(model, EngineSettings()) if args.compare else None
    rounds = max(1, args.rounds) if args.compare else 1
    t_rule = t_full = 0.0
    for r in range(rounds):                # with --compare: interleaved text by text, so that a
        results, full = [], []             # busy machine's drift hits both sides alike
        for i in ids:
            t0 = time.perf_counter()
            results.append(classify_ids(engine, probes, i, rule))
            t_rule += time.perf_counter() - t0
            if full_engine is not None:
                t0 = time.perf_counter()
                full.append(full_depth_ids(full_engine, probes, i))
                t_full += time.perf_counter() - t0
    pred = np.array([r.label for r in results])
    s = {"texts": len(texts), "stop": str(rule), "pooling": probes.pooling,
         "mean_stop_layer": round(float(np.mean([r.stop_layer for r in results])), 3),
         "compute_fraction": round(sum(r.flops for r in results) / sum(r.full_flops for r in results), 4),
         "texts_per_s": round(rounds * len(texts) / t_rule, 2), "threads": n_threads,
         **{k: v for k, v in engine.settings().items()}}
    if y is not None:
        s["accuracy"] = round(100 * float((pred == y).mean()), 2)
    if full_engine is not None:
        fpred = np.array([r.label for r in full])
        s["full_depth_texts_per_s"] = round(rounds * len(texts) / t_full, 2)
        s["speedup"] = round(t_full / t_rule, 3)
        s["agreement_with_full"] = round(100 * float((fpred == pred).mean()), 2)
        if y is not None:
            s["full_depth_accuracy"] = round(100 * float((fpred == y).mean()), 2)
    s["predictions"] = [{"label": probes.labels[r.label], "prob": round(float(r.probs.max()), 4),
                         "stop_layer": r.stop_layer} for r in results]
    if args.json:
        print(json.dumps(s))
        return 0
    for t, r in zip(texts, results):
        short = t if len(t) <= 60 else t[:57] + "..."
        print(f"{probes.labels[r.label]}\t{r.probs.max():.3f}\tlayer {r.stop_layer}\t{short}")
    line = (f"{len(texts)} texts, --stop {rule}: mean stop layer {s['mean_stop_layer']:.2f}/{model.config.n_layer}, "
            f"compute fraction {s['compute_fraction']:.3f}, {s['texts_per_s']:.1f} texts/s")
    if "accuracy" in s:
        line += f", accuracy {s['accuracy']:.2f}%"
    if full_engine is not None:
        line += f"; full depth {s['full_depth_texts_per_s']:.1f} texts/s (speed-up {s['speedup']:.2f}x)"
    print(line)
    return 0


COMMANDS["probe-train"] = cmd_probe_train
COMMANDS["classify"] = cmd_classify


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise MinadeptError("missing command (generate, eval, calibrate, dump, check, probe-train, classify or info); see minadept --help")
        from . import backend
        backend.use()
        _check_threads(getattr(args, "threads", None))
        try:
            return COMMANDS[args.command](args)
        finally:
            if getattr(args, "thread_limits", None) is not None:
                args.thread_limits.restore_original_limits()
    except MinadeptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if str(e).startswith("minadept") else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
