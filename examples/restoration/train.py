#!/usr/bin/env python3
"""Train a small byte-level masked-character restoration model on CPU.

This is a self-contained plain-PyTorch script (it does not import reportgen): it plays the role of
a user's own training code and writes checkpoints in the "RestorationModel" layout
(shared/seeds/004): each ``.pt`` file is

    torch.save({"model_state_dict": model.state_dict(), "config": config, "vocab_size": 258}, path)

with ``config`` = {vocab_size, max_position, d_model, n_heads, d_ff, n_layers, dropout, rotary_base}
and state-dict keys ``embed.weight``, ``layers.<i>.{ln1,ln2}.{weight,bias}``,
``layers.<i>.attn.{q,k,v,out}_proj.weight`` (no biases), ``layers.<i>.ff.{0,2}.{weight,bias}``,
``final_ln.{weight,bias}``, ``head.{weight,bias}``. There are no position-embedding weights: RoPE
is computed in the forward pass.

Model: pre-norm transformer encoder, ``x = x + attn(ln1(x)); x = x + ff(ln2(x))``, then
``head(final_ln(x))``. Attention is bidirectional (a causal mask only when config["causal"] is
true), RoPE in the GPT-NeoX / HF-Llama "rotate_half" convention (dim i paired with dim i + dh/2),
exact (erf) GELU. Dropout acts only in training mode.

Vocabulary: ids 0..255 are the bytes, 256 = [PAD], 257 = [MASK] (V = 258). ``vocab.json`` beside
the checkpoints maps each id (as a string) to its token: chr(id) for bytes, "[PAD]", "[MASK]".

Objective: random 128-byte windows of the training text (UTF-8 bytes); in each window 15 % of the
positions (round(0.15 * 128) = 19) are chosen; a chosen position becomes [MASK] with probability
0.8, a uniformly random byte with probability 0.1, and stays unchanged with probability 0.1; the
cross-entropy is taken on the chosen positions only. AdamW (weight decay 0.01 on every parameter),
linear warmup for 50 steps then cosine decay to 10 % of --lr, gradient norm clipped to 1.0.

At each save point the script prints the masked accuracy and loss on 64 fixed windows of the
evaluation text (evenly spaced offsets; masking drawn from a generator seeded with 0, independent
of --seed), so the same numbers can be recomputed from any checkpoint with ``evaluate``.

Example (from the repository root; make the data first with make_data.py):

    OMP_NUM_THREADS=1 python examples/restoration/train.py

Runs with the same arguments, thread count and machine repeat exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 256
MASK_ID = 257
VOCAB_SIZE = 258
EVAL_WINDOWS = 64
EVAL_SEED = 0

DEFAULT_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "max_position": 128,
    "d_model": 128,
    "n_heads": 4,
    "d_ff": 512,
    "n_layers": 4,
    "dropout": 0.0,
    "rotary_base": 10000,
}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_cos_sin(seq_len: int, d_head: int, base: float, device=None, dtype=torch.float32):
    """cos, sin of shape [seq_len, d_head], laid out as cat([angles, angles])."""
    inv_freq = base ** (-torch.arange(0, d_head // 2, dtype=torch.float32, device=device) * 2.0 / d_head)
    pos = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)                       # [T, dh/2]
    emb = torch.cat([angles, angles], dim=-1)                 # [T, dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, dh]; cos, sin: [T, dh]."""
    return x * cos + rotate_half(x) * sin


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rotary_base: float, causal: bool):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.rotary_base = rotary_base
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, dh = self.n_heads, self.d_head
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)   # [B, H, T, dh]
        k = self.k_proj(x).view(B, T, H, dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, dh).transpose(1, 2)
        cos, sin = rope_cos_sin(T, dh, self.rotary_base, device=x.device, dtype=x.dtype)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)      # [B, H, T, T]
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        probs = self.attn_drop(scores.softmax(dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(B, T, D)
        return self.out_proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, dropout = cfg["d_model"], cfg["dropout"]
        self.ln1 = nn.LayerNorm(D)
        self.attn = MultiHeadSelfAttention(D, cfg["n_heads"], dropout, cfg["rotary_base"],
                                           bool(cfg.get("causal", False)))
        self.ln2 = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, cfg["d_ff"]), nn.GELU(), nn.Linear(cfg["d_ff"], D))
        self.ff_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.ff_drop(self.ff(self.ln2(x)))
        return x


class RestorationModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        D = cfg["d_model"]
        self.embed = nn.Embedding(cfg["vocab_size"], D)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg["vocab_size"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.config["max_position"]:
            raise ValueError(f"sequence length {input_ids.shape[1]} > max_position "
                             f"{self.config['max_position']}")
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_ln(x))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_bytes(path: Path) -> torch.Tensor:
    data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def mask_windows(windows: torch.Tensor, gen: torch.Generator, rate: float = 0.15):
    """Return (inputs, chosen) for [B, T] byte windows: 80/10/10 masking of round(rate*T) positions."""
    B, T = windows.shape
    n_chosen = max(1, round(rate * T))
    order = torch.rand(B, T, generator=gen).argsort(dim=1)
    chosen = torch.zeros(B, T, dtype=torch.bool)
    chosen.scatter_(1, order[:, :n_chosen], True)
    action = torch.rand(B, T, generator=gen)
    random_bytes = torch.randint(0, 256, (B, T), generator=gen)
    inputs = windows.clone()
    inputs[chosen & (action < 0.8)] = MASK_ID
    rnd = chosen & (action >= 0.8) & (action < 0.9)
    inputs[rnd] = random_bytes[rnd]
    return inputs, chosen


def random_windows(data: torch.Tensor, batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - T + 1, (batch,), generator=gen)
    return torch.stack([data[s:s + T] for s in starts.tolist()])


def eval_batch(data: torch.Tensor, T: int, n: int = EVAL_WINDOWS, seed: int = EVAL_SEED):
    """n windows at evenly spaced offsets of the evaluation text, masked with a fixed seed."""
    last = len(data) - T
    starts = [round(i * last / (n - 1)) for i in range(n)] if n > 1 else [0]
    windows = torch.stack([data[s:s + T] for s in starts])
    gen = torch.Generator().manual_seed(seed)
    inputs, chosen = mask_windows(windows, gen)
    return inputs, windows, chosen


@torch.no_grad()
def evaluate(model: nn.Module, inputs, targets, chosen) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    logits = model(inputs)
    model.train(was_training)
    lg, tg = logits[chosen], targets[chosen]
    loss = F.cross_entropy(lg, tg).item()
    acc = (lg.argmax(-1) == tg).float().mean().item()
    return acc, loss


def write_vocab(path: Path) -> None:
    vocab = {str(i): chr(i) for i in range(256)}
    vocab[str(PAD_ID)] = "[PAD]"
    vocab[str(MASK_ID)] = "[MASK]"
    path.write_text(json.dumps(vocab, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="examples/restoration/data",
                    help="folder with train.txt and eval.txt (from make_data.py)")
    ap.add_argument("--out", default="examples/restoration/checkpoints/restoration_bytes")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--save-at", default="200,500,800", help="comma list of steps to save at")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    save_at = sorted({int(s) for s in args.save_at.split(",") if s.strip()})
    if any(s < 1 or s > args.steps for s in save_at):
        ap.error("--save-at values must lie in 1..--steps")

    cfg = dict(DEFAULT_CONFIG)
    T = cfg["max_position"]
    data_dir = Path(args.data)
    train_data = load_bytes(data_dir / "train.txt")
    eval_data = load_bytes(data_dir / "eval.txt")
    ev_inputs, ev_targets, ev_chosen = eval_batch(eval_data, T)

    model = RestorationModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {json.dumps(cfg)}", flush=True)
    print(f"parameters {n_params:,}; train {len(train_data):,} bytes, eval {len(eval_data):,} bytes; "
          f"threads {torch.get_num_threads()}", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_factor(step: int) -> float:  # step = number of optimizer steps already taken
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_vocab(out / "vocab.json")

    acc, loss = evaluate(model, ev_inputs, ev_targets, ev_chosen)
    print(f"step 0 eval masked_acc {acc:.4f} masked_loss {loss:.4f}", flush=True)

    model.train()
    t0 = time.time()
    running, n_running = 0.0, 0
    for step in range(1, args.steps + 1):
        windows = random_windows(train_data, args.batch_size, T, gen)
        inputs, chosen = mask_windows(windows, gen)
        logits = model(inputs)
        loss = F.cross_entropy(logits[chosen], windows[chosen])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        n_running += 1
        if step % args.log_every == 0:
            el = time.time() - t0
            print(f"step {step} train_loss {running / n_running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el:.0f}s ({el / step:.3f} s/step)", flush=True)
            running, n_running = 0.0, 0
        if step in save_at:
            acc, ev_loss = evaluate(model, ev_inputs, ev_targets, ev_chosen)
            path = out / f"step_{step}.pt"
            torch.save({"model_state_dict": model.state_dict(), "config": cfg,
                        "vocab_size": cfg["vocab_size"]}, path)
            print(f"step {step} eval masked_acc {acc:.4f} masked_loss {ev_loss:.4f} "
                  f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    print(f"done: {args.steps} steps in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
