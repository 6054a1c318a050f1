"""Train minadept's embedded GPT-2 on a text file (from scratch, or continuing from a checkpoint).

This is a *training* script (needs the `train` extra: torch, transformers). The runtime never
imports it. It trains a standard GPT-2 (learned positions, tied ``lm_head``, next-token
cross-entropy at the last layer) with ``transformers.GPT2LMHeadModel`` as the PyTorch module, so
the output directory is a plain Hugging Face GPT-2 checkpoint.

Early-exit training (``--exit-loss-weight W``, in the spirit of LayerSkip, arXiv 2404.16710): each
step also computes the next-token cross-entropy of ``--exit-layers-per-step`` randomly chosen
intermediate layers k (1 <= k < n_layer) read out through the model's own ``ln_f`` and tied
``lm_head`` -- exactly what minadept's engine computes when a token exits after block k with the
identity exit map -- and minimises ``CE_final + W * mean_k CE_k``. The architecture is unchanged.
``--init DIR`` starts from an existing checkpoint (its weights and tokenizer) instead of scratch.

Inputs: a training text file whose documents are separated by ``<|endoftext|>`` lines (the shared
corpus lists stories first and books after, so training windows are sampled at random positions),
a held-out text file, a model shape, a step count and a seed.

Output directory (``--out``):
    config.json, model.safetensors, tokenizer.json   the model (Hugging Face GPT-2 layout)
    train_log.json                                   loss curve, throughput, settings
    ckpt.pt                                          optimizer state for --resume (never commit)

Example (the embedded model's exact command is in its model card):
    python weights/train.py --train ../shared/corpus/train.txt --valid ../shared/corpus/valid.txt \
        --out weights/minigpt2-stories --steps 1800 --seed 1337
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- data

def split_documents(text: str) -> list[str]:
    """Split a corpus file into documents at lines that are exactly ``<|endoftext|>``."""
    docs, cur = [], []
    for line in text.split("\n"):
        if line == EOT:
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    if any(cur):
        docs.append("\n".join(cur))
    return [d for d in docs if d]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library; EOT is special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def encode_stream(tok, docs: list[str]) -> np.ndarray:
    """Encode documents as one token stream, each document followed by EOT. Returns uint16 [N]."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


# ----------------------------------------------------------------------------- schedule

def learning_rate(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- model surgery

def extend_positions(model, n_positions: int, seed: int):
    """A copy of ``model`` with a context of ``n_positions``: rows past the trained ones start from
    the last trained ``wpe`` row plus N(0, 0.01) noise, so a long window starts out looking "late"."""
    import torch
    from transformers import GPT2LMHeadModel

    old = model.config.n_positions
    if n_positions <= old:
        raise SystemExit(f"error: --extend-positions {n_positions} is not above the model's {old}")
    config = model.config
    config.n_positions = n_positions
    state = model.state_dict()
    wpe = state["transformer.wpe.weight"]
    g = torch.Generator().manual_seed(seed)
    extra = wpe[-1:].repeat(n_positions - old, 1) + 0.01 * torch.randn(n_positions - old, wpe.shape[1], generator=g)
    state["transformer.wpe.weight"] = torch.cat([wpe, extra])
    grown = GPT2LMHeadModel(config)
    grown.load_state_dict(state)
    return grown


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training text file (<|endoftext|> lines separate documents)")
    p.add_argument("--valid", required=True, help="held-out text file, same format")
    p.add_argument("--out", required=True, help="output directory (Hugging Face GPT-2 layout)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--max-train-bytes", type=int, default=0, help="use only the first N bytes (smoke tests)")
    p.add_argument("--max-valid-bytes", type=int, default=0, help="use only the first N held-out bytes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--init", default=None,
                   help="start from this Hugging Face GPT-2 directory (weights and tokenizer.json); "
                        "the shape flags are then taken from its config")
    p.add_argument("--exit-loss-weight", type=float, default=0.0,
                   help="weight W of the intermediate-layer loss (0 = plain last-layer training)")
    p.add_argument("--exit-layers-per-step", type=int, default=3,
                   help="intermediate layers sampled per step for the early-exit loss")
    p.add_argument("--exit-min-layer", type=int, default=1,
                   help="shallowest exit layer k the early-exit loss samples (1-based)")
    p.add_argument("--exit-token-fraction", type=float, default=1.0,
                   help="fraction of a step's positions each sampled exit layer is scored on "
                        "(a random subset per layer; cuts the cost of the extra LM-head products)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="share a of the early-exit loss that is self-distillation: per layer "
                        "(1-a) CE_k + a KL(p_final || p_k), p_final detached")
    p.add_argument("--extend-positions", type=int, default=0,
                   help="with --init: grow the context to N positions (new wpe rows start from "
                        "the last trained row plus noise)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if not (math.isfinite(args.exit_loss_weight) and args.exit_loss_weight >= 0) or args.exit_layers_per_step < 1:
        p.error("--exit-loss-weight must be a finite number >= 0 and --exit-layers-per-step >= 1")
    if not (0 < args.exit_token_fraction <= 1) or not (0 <= args.distill <= 1) or args.exit_min_layer < 1:
        p.error("--exit-token-fraction must be in (0, 1], --distill in [0, 1], --exit-min-layer >= 1")
    if args.extend_positions and args.init is None:
        p.error("--extend-positions needs --init")
    if args.init is not None and not (Path(args.init) / "tokenizer.json").is_file():
        p.error(f"--init {args.init}: no tokenizer.json there")
    if args.init is not None and not (Path(args.init) / "model.safetensors").is_file():
        p.error(f"--init {args.init}: no model.safetensors there")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    text = Path(args.train).read_text(encoding="utf-8")
    if args.max_train_bytes:
        text = text[: args.max_train_bytes]
    train_docs = split_documents(text)
    valid_text = Path(args.valid).read_text(encoding="utf-8")
    if args.max_valid_bytes:
        valid_text = valid_text[: args.max_valid_bytes]
    valid_docs = split_documents(valid_text)

    tok_path = out / "tokenizer.json"
    if args.init is not None:
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(Path(args.init) / "tokenizer.json"))
        except Exception as e:                                    # tokenizers raises a bare Exception
            raise SystemExit(f"error: --init {args.init}: cannot read tokenizer.json ({e})") from None
    elif args.resume and tok_path.exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
    else:
        t0 = time.time()
        tok = train_tokenizer(train_docs, args.vocab_size)
        tok.save(str(tok_path))
        print(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.time() - t0:.1f}s", file=sys.stderr)
    vocab_size = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise SystemExit(f"error: the tokenizer has no {EOT} token")
    train_ids = encode_stream(tok, train_docs)
    valid_ids = encode_stream(tok, valid_docs)
    print(f"tokens: train {len(train_ids):,}  valid {len(valid_ids):,}  "
          f"(train bytes/token {len(text.encode()) / len(train_ids):.2f})", file=sys.stderr)

    T, B = args.n_positions, args.batch_size

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=T, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )
    if args.init is not None:
        try:   # fp32 whatever the checkpoint's dtype: AdamW in fp16 on CPU diverges to NaN
            model = GPT2LMHeadModel.from_pretrained(args.init, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --init {args.init}: cannot load the model ({type(e).__name__}: {e})") from None
        if args.extend_positions:
            model = extend_positions(model, args.extend_positions, args.seed)
        config = model.config
        T = config.n_positions
        if config.vocab_size != vocab_size:
            raise SystemExit(f"error: --init model has vocab {config.vocab_size}, tokenizer {vocab_size}")
        # the run's settings are the checkpoint's shape, not the (ignored) shape flags
        args.n_layer, args.n_head, args.n_embd, args.n_positions = (config.n_layer, config.n_head,
                                                                    config.n_embd, config.n_positions)
        if Path(args.init).resolve() != out.resolve():
            tok.save(str(tok_path))
    else:
        model = GPT2LMHeadModel(config)
    if len(train_ids) <= T + 1:
        raise SystemExit(f"error: training text has {len(train_ids)} tokens, need more than {T + 1}")
    if len(valid_ids) <= T + 1:
        raise SystemExit(f"error: held-out text has {len(valid_ids)} tokens, need more than {T + 1}")
    L = config.n_layer
    W = args.exit_loss_weight
    if W > 0 and L < 2:
        raise SystemExit("error: --exit-loss-weight needs a model with at least 2 layers (it has 1)")
    if W > 0 and args.exit_min_layer >= L:
        raise SystemExit(f"error: --exit-min-layer {args.exit_min_layer} leaves no intermediate layer of {L}")
    n_exit = args.exit_layers_per_step = min(args.exit_layers_per_step, L - args.exit_min_layer)   # logged as used
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    log = {"settings": vars(args), "n_params": n_params, "train": [], "valid": [],
           "tokens_per_step": B * T, "wall_seconds": 0.0}
    start = 0
    ckpt = out / "ckpt.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: {ckpt} does not match this model's shape; "
                             f"remove it or drop --resume ({str(e).splitlines()[0]})") from None
        rng.bit_generator.state = state["rng"]
        log = state["log"]
        start = state["step"]
        if log["settings"] != vars(args):       # e.g. --steps changed: the schedule follows the new one
            log.setdefault("resumed", []).append({"step": start, "settings": dict(vars(args))})
            log["settings"] = vars(args)
        print(f"resumed at step {start}", file=sys.stderr)

    # Fixed held-out windows: evenly spaced over valid.txt.
    n_win = min(args.eval_windows, (len(valid_ids) - 1) // (T + 1))
    starts = np.linspace(0, len(valid_ids) - T - 1, n_win).astype(np.int64)
    valid_batch = torch.from_numpy(np.stack([valid_ids[s:s + T + 1] for s in starts]).astype(np.int64))

    def ce(logits, targets, reduction="mean"):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab_size), targets.reshape(-1), reduction=reduction)

    def exit_logits(hidden):
        """Logits of a token that exits with residual stream ``hidden`` (ln_f, tied lm_head)."""
        return model.lm_head(model.transformer.ln_f(hidden))

    n_tok = B * T
    n_sub = max(1, int(round(args.exit_token_fraction * n_tok)))

    def exit_layer_loss(o, k: int, targets):
        """(1-a) CE + a KL(p_final || p_k) of exiting after block k, on a random subset of positions."""
        pos = torch.from_numpy(rng.choice(n_tok, size=n_sub, replace=False)) if n_sub < n_tok else slice(None)
        h = o.hidden_states[k].reshape(n_tok, -1)[pos]
        logits = exit_logits(h)
        out = (1 - args.distill) * ce(logits, targets.reshape(-1)[pos]) if args.distill < 1 else 0.0
        if args.distill > 0:
            p_final = torch.log_softmax(o.logits.reshape(n_tok, -1)[pos].detach(), dim=-1)
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), p_final,
                                            log_target=True, reduction="batchmean")
            out = out + args.distill * kl
        return out

    def evaluate() -> list[float]:
        """Held-out loss (nats/token) of exiting after each block 1..n_layer; the last is the model's."""
        model.eval()
        with torch.no_grad():
            sums = [0.0] * L
            for i in range(0, len(valid_batch), B):
                xb = valid_batch[i:i + B]
                o = model(input_ids=xb[:, :-1], output_hidden_states=True)
                for k in range(1, L):  # hidden_states[k] is the residual stream after block k
                    sums[k - 1] += ce(exit_logits(o.hidden_states[k]), xb[:, 1:], "sum").item()
                sums[L - 1] += ce(o.logits, xb[:, 1:], "sum").item()
        model.train()
        return [s / (len(valid_batch) * T) for s in sums]

    def save_checkpoint(step: int) -> None:
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "log": log, "step": step}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    t_last = time.time()
    for step in bar:
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train_ids) - T - 1, size=B)
        xb = torch.from_numpy(np.stack([train_ids[i:i + T + 1] for i in idx]).astype(np.int64))
        o = model(input_ids=xb[:, :-1], output_hidden_states=W > 0)
        loss = ce(o.logits, xb[:, 1:])
        total = loss
        if W > 0:
            ks = rng.choice(np.arange(args.exit_min_layer, L), size=n_exit, replace=False)
            exit_loss = sum(exit_layer_loss(o, int(k), xb[:, 1:]) for k in ks) / n_exit
            total = loss + W * exit_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        now = time.time()
        dt, t_last = now - t_last, now
        log["wall_seconds"] += dt
        log["train"].append([step + 1, round(loss.item(), 5)])
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{B * T / dt:.0f}", lr=f"{lr:.2e}")
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            by_layer = evaluate()
            vl = by_layer[-1]
            log["valid"].append([step + 1, round(vl, 5)])
            log.setdefault("valid_by_layer", []).append([step + 1, [round(v, 5) for v in by_layer]])
            bar.write(f"step {step + 1}: train {loss.item():.4f}  valid {vl:.4f}  ppl {math.exp(vl):.2f}  "
                      f"by layer " + " ".join(f"{v:.2f}" for v in by_layer))
            t_last = time.time()  # evaluation time is not training throughput
        if (step + 1) % args.checkpoint_every == 0 or last:
            save_checkpoint(step + 1)

    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    log["tokens_seen"] = args.steps * B * T
    (out / "train_log.json").write_text(json.dumps(log))
    print(f"saved {out} ({n_params:,} parameters, {log['tokens_seen']:,} tokens, "
          f"{log['wall_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
