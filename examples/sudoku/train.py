#!/usr/bin/env python3
"""Train a small TRM (reportgen.models.trm) on CPU and save checkpoints exactly as upstream does.

Input: a dataset folder in the upstream layout (examples/sudoku/make_dataset.py writes one).
Output: a run folder `<checkpoints>/<run_name>/` holding

* `all_config.yaml`: the run config as upstream `pretrain.py` dumps it (PyYAML, block style,
  keys sorted at every level, the same fields as upstream's `PretrainConfig`, `arch` nested);
* `step_<N>` (no extension), one per evaluation: `torch.save` of the raw state dict, every key
  prefixed `_orig_mod.model.inner.`, keys in upstream's order, N = optimizer steps so far. With
  --ema (the default, as in upstream's Sudoku recipes) the saved weights are the EMA copy of the
  trainable parameters, with the live buffers (H_init, L_init, puzzle_emb.weights).

Training (a simplified version of upstream's, documented here rather than copied):

* An epoch draws one random member of every training group (the original puzzle or one of its
  augmentations) and walks them in random order in batches of --batch-size, dropping the last
  short batch.
* Deep supervision: for every batch the carry starts at (H_init, L_init) and the model runs
  exactly `halt_max_steps` ACT steps; EVERY ACT step computes a loss and takes one AdamW step,
  and the carry is detached between steps. (Unlike upstream, samples are not swapped out of the
  batch when the Q head says "halt": every sample gets every step, so
  `halt_exploration_prob` is recorded in the config but has no effect.)
* Loss per ACT step = mean over rows of the per-cell cross-entropy over all 81 cells (givens
  included, as upstream) + --q-loss-weight (default 0.5) * binary cross-entropy of q_halt against
  "the whole board is predicted correctly" at that step. The cell cross-entropy is plain softmax CE by default
  (`--loss softmax_cross_entropy`); `--loss stablemax_cross_entropy` uses upstream's stablemax
  (s(x) = 1/(1-x) for x < 0, x + 1 otherwise) in float64 instead. The choice is written to
  `arch.loss.loss_type`. q_continue is never trained (upstream's no_ACT_continue = True).
* AdamW (betas --beta1/--beta2, decoupled weight decay) with linear warm-up then cosine decay to
  lr * lr_min_ratio; optional EMA of the parameters.
* The puzzle embedding (`puzzle_emb.weights`, a buffer with a single row because every puzzle
  has the one identifier "<blank>") is NOT trained: it stays zero. Its upstream fields
  (puzzle_emb_lr, puzzle_emb_weight_decay) are recorded in the config for completeness only.
* Evaluation (at every checkpoint) runs the whole test split in eval mode for exactly
  halt_max_steps ACT steps from a fresh carry and scores the last step's argmax, as upstream's
  evaluation does; it prints blank-cell accuracy, all-cell accuracy, the exact-solve rate, how
  often (q_halt > 0) agrees with "solved", and the share of puzzles with q_halt > 0, all at the
  last ACT step.

Step counting: one epoch has floor(train groups / batch size) batches and every batch takes
halt_max_steps AdamW steps, so N in `step_<N>` and the printed "optimizer steps" are
epochs x batches/epoch x halt_max_steps (the LR schedule and EMA also advance per ACT step).

Deterministic for a given --seed and thread count (set OMP_NUM_THREADS or --threads).

Example (from the repository root; see examples/sudoku/README.md for the committed run):

    OMP_NUM_THREADS=2 python examples/sudoku/train.py \\
        --data examples/sudoku/data/sudoku-easy-2400-aug-0 --run-name trm_sudoku_easy
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # so `reportgen` imports without installing it

from reportgen.models.trm import TRM, TRMConfig  # noqa: E402

PREFIX = "_orig_mod.model.inner."  # torch.compile wrapper -> ACTLossHead.model -> ACT wrapper .inner
MODEL_NAME = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"


# --- data -----------------------------------------------------------------------------------
def load_split(root: Path, split: str) -> dict:
    meta = json.loads((root / split / "dataset.json").read_text())
    out = {"meta": meta}
    for f in ("inputs", "labels", "puzzle_identifiers", "group_indices"):
        parts = [np.load(root / split / f"{s}__{f}.npy") for s in meta["sets"]]
        out[f] = parts[0] if f == "group_indices" else np.concatenate(parts)
    if len(meta["sets"]) != 1:
        raise SystemExit(f"{root / split}: only single-set datasets are supported")
    for f in ("inputs", "labels", "puzzle_identifiers"):
        out[f] = torch.from_numpy(out[f].astype(np.int64))
    return out


def epoch_batches(rng: np.random.Generator, groups: np.ndarray, batch_size: int):
    """Row indices for one epoch: one random member per group, shuffled, full batches only."""
    starts, sizes = groups[:-1], np.diff(groups)
    order = rng.permutation(len(starts))
    rows = starts[order] + (rng.random(len(order)) * sizes[order]).astype(np.int64)
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        yield torch.from_numpy(rows[i:i + batch_size])


# --- loss -----------------------------------------------------------------------------------
def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-cell cross-entropy under stablemax, in float64: p_i = s(x_i) / sum_j s(x_j)."""
    x = logits.double()
    s = torch.where(x < 0, 1.0 / (1.0 - x), x + 1.0)
    logp = torch.log(s / s.sum(-1, keepdim=True))
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def cell_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, S] per-cell loss."""
    if kind == "stablemax_cross_entropy":
        return stablemax_cross_entropy(logits, labels)
    return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")


# --- schedule / EMA -------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from base down to base * min_ratio."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's trainable parameters (buffers are taken live)."""

    def __init__(self, model: TRM, rate: float):
        self.rate = rate
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: TRM) -> None:
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1 - self.rate)

    def copy_of(self, model: TRM) -> TRM:
        ema_model = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in ema_model.named_parameters():
                p.copy_(self.shadow[k])
        return ema_model


# --- evaluation / saving --------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: TRM, test: dict, batch_size: int) -> dict:
    """Blank-cell accuracy, all-cell accuracy and exact-solve rate after halt_max_steps ACT steps."""
    was_training = model.training
    model.eval()
    preds, q_halt = [], []
    for i in range(0, len(test["inputs"]), batch_size):
        inp = test["inputs"][i:i + batch_size]
        x = model.input_embeddings(inp, test["puzzle_identifiers"][i:i + batch_size])
        z_H, z_L = model.initial_carry(len(inp), inp.device)
        for _ in range(model.cfg.halt_max_steps):
            z_H, z_L, logits, qh, _ = model.act_step(z_H, z_L, x)
        preds.append(logits.argmax(-1))
        q_halt.append(qh)
    model.train(was_training)
    preds, q_halt = torch.cat(preds), torch.cat(q_halt)
    correct = preds == test["labels"]
    blank = test["inputs"] == 1
    solved = correct.all(-1)
    return {
        "blank_acc": correct[blank].float().mean().item(),
        "cell_acc": correct.float().mean().item(),
        "exact": solved.float().mean().item(),
        "n_exact": int(solved.sum()),
        "q_halt_acc": ((q_halt > 0) == solved).float().mean().item(),
        "q_halt_pos": (q_halt > 0).float().mean().item(),
    }


def upstream_state_dict(model: TRM) -> dict:
    """The state dict as upstream's file holds it: H_init/L_init first, keys prefixed."""
    sd = model.state_dict()
    order = ["H_init", "L_init"] + [k for k in sd if k not in ("H_init", "L_init")]
    return {PREFIX + k: sd[k].detach().to("cpu").clone().contiguous() for k in order}


def run_config(args, cfg: TRMConfig, data_rel: str, ckpt_rel: str, project: str) -> dict:
    """The fields of upstream's PretrainConfig, filled with this run's values."""
    expansion = int(cfg.expansion) if float(cfg.expansion).is_integer() else cfg.expansion
    return {
        "arch": {
            "name": MODEL_NAME,
            "loss": {"name": "losses@ACTLossHead", "loss_type": args.loss},
            "hidden_size": cfg.hidden_size,
            "num_heads": cfg.num_heads,
            "expansion": expansion,
            "H_cycles": cfg.H_cycles,
            "L_cycles": cfg.L_cycles,
            "H_layers": 0,
            "L_layers": cfg.L_layers,
            "halt_max_steps": cfg.halt_max_steps,
            "halt_exploration_prob": args.halt_exploration_prob,
            "puzzle_emb_ndim": cfg.puzzle_emb_ndim,
            "puzzle_emb_len": cfg.puzzle_emb_len,
            "pos_encodings": cfg.pos_encodings,
            "forward_dtype": cfg.forward_dtype,
            "mlp_t": cfg.mlp_t,
            "no_ACT_continue": True,
        },
        "beta1": args.beta1,
        "beta2": args.beta2,
        "checkpoint_every_eval": True,
        "checkpoint_path": ckpt_rel,
        "data_paths": [data_rel],
        "data_paths_test": [],
        "ema": args.ema,
        "ema_rate": args.ema_rate,
        "epochs": args.epochs,
        "eval_interval": args.eval_interval,
        "eval_save_outputs": [],
        "evaluators": [],
        "freeze_weights": False,
        "global_batch_size": args.batch_size,
        "load_checkpoint": None,
        "lr": args.lr,
        "lr_min_ratio": args.lr_min_ratio,
        "lr_warmup_steps": args.lr_warmup_steps,
        "min_eval_interval": 0,
        "project_name": project,
        "puzzle_emb_lr": args.lr,
        "puzzle_emb_weight_decay": args.weight_decay,
        "run_name": args.run_name,
        "seed": args.seed,
        "weight_decay": args.weight_decay,
    }


def rel_to_repo(p: Path) -> str:
    """`p` relative to the repository root when it lies inside it (as the config records it)."""
    p = p.resolve()
    try:
        return p.relative_to(REPO).as_posix()
    except ValueError:
        return str(p)


# --- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder in the upstream layout")
    ap.add_argument("--checkpoints", default=str(REPO / "examples/sudoku/checkpoints"),
                    help="folder that receives the run folder")
    ap.add_argument("--run-name", default="trm_sudoku_easy", help="run folder name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    g = ap.add_argument_group("model (arch)")
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-heads", type=int, default=2)
    g.add_argument("--expansion", type=float, default=4)
    g.add_argument("--H-cycles", type=int, default=2)
    g.add_argument("--L-cycles", type=int, default=2)
    g.add_argument("--L-layers", type=int, default=2)
    g.add_argument("--halt-max-steps", type=int, default=4)
    g.add_argument("--halt-exploration-prob", type=float, default=0.1, help="recorded only (see docstring)")
    g.add_argument("--puzzle-emb-len", type=int, default=16)
    g.add_argument("--pos-encodings", default="rope", choices=["rope", "learned", "none"])
    g.add_argument("--loss", default="softmax_cross_entropy",
                   choices=["softmax_cross_entropy", "stablemax_cross_entropy"])
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--eval-interval", type=int, default=1, help="epochs between evaluations/checkpoints")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--lr-min-ratio", type=float, default=0.1)
    g.add_argument("--lr-warmup-steps", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema-rate", type=float, default=0.99)
    g.add_argument("--q-loss-weight", type=float, default=0.5, help="weight of the q_halt BCE term")
    g.add_argument("--eval-batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    if args.epochs % args.eval_interval:
        ap.error("--epochs must be a multiple of --eval-interval (as upstream requires)")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    data = Path(args.data)
    train, test = load_split(data, "train"), load_split(data, "test")
    meta = train["meta"]
    cfg = TRMConfig(
        hidden_size=args.hidden_size, num_heads=args.num_heads, expansion=args.expansion,
        H_cycles=args.H_cycles, L_cycles=args.L_cycles, L_layers=args.L_layers,
        halt_max_steps=args.halt_max_steps, puzzle_emb_ndim=args.hidden_size,
        puzzle_emb_len=args.puzzle_emb_len, pos_encodings=args.pos_encodings, forward_dtype="float32",
        mlp_t=False, vocab_size=int(meta["vocab_size"]), seq_len=int(meta["seq_len"]),
        num_puzzle_identifiers=int(meta["num_puzzle_identifiers"]),
    )
    model = TRM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    run_dir = Path(args.checkpoints) / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("step_*"):  # a rerun replaces the previous run's checkpoints
        old.unlink()
    data_name = data.resolve().name
    rc = run_config(args, cfg, rel_to_repo(data), rel_to_repo(run_dir), f"{data_name.capitalize()}-ACT-torch")
    import yaml

    (run_dir / "all_config.yaml").write_text(yaml.dump(rc, sort_keys=True, default_flow_style=False))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                            weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_rate) if args.ema else None
    groups = train["group_indices"].astype(np.int64)
    batches_per_epoch = (len(groups) - 1) // args.batch_size
    total_steps = args.epochs * batches_per_epoch * cfg.halt_max_steps
    print(f"TRM {n_params:,} parameters; {len(groups) - 1} train groups ({len(train['inputs'])} rows), "
          f"{len(test['inputs'])} test rows; {batches_per_epoch} batches/epoch x {cfg.halt_max_steps} ACT steps; "
          f"{total_steps} optimizer steps; torch threads {torch.get_num_threads()}", flush=True)

    step, t0 = 0, time.time()
    log_loss, log_acc, log_n = 0.0, 0.0, 0
    for epoch in range(1, args.epochs + 1):
        for rows in epoch_batches(rng, groups, args.batch_size):
            inputs, labels = train["inputs"][rows], train["labels"][rows]
            pids = train["puzzle_identifiers"][rows]
            z_H, z_L = model.initial_carry(len(rows), inputs.device)
            for _ in range(cfg.halt_max_steps):
                for pg in opt.param_groups:
                    pg["lr"] = lr_at(step, total_steps, args.lr, args.lr_warmup_steps, args.lr_min_ratio)
                x = model.input_embeddings(inputs, pids)  # recomputed: embeddings change every step
                z_H, z_L, logits, q_halt, _ = model.act_step(z_H, z_L, x)
                z_H, z_L = z_H.detach(), z_L.detach()
                with torch.no_grad():
                    solved = (logits.argmax(-1) == labels).all(-1)
                lm_loss = cell_loss(args.loss, logits, labels).mean(-1).mean()
                q_loss = F.binary_cross_entropy_with_logits(q_halt, solved.float())
                loss = lm_loss + args.q_loss_weight * q_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if ema is not None:
                    ema.update(model)
            blank = inputs == 1
            log_loss += lm_loss.item()
            log_acc += (logits.argmax(-1) == labels)[blank].float().mean().item()
            log_n += 1
        if epoch % args.eval_interval == 0:
            subject = ema.copy_of(model) if ema is not None else model
            m = evaluate(subject, test, args.eval_batch_size)
            path = run_dir / f"step_{step}"
            torch.save(upstream_state_dict(subject), path)
            print(f"epoch {epoch:4d} step {step:6d} {time.time() - t0:6.0f}s | train lm_loss {log_loss / log_n:.3f} "
                  f"blank acc (last ACT step) {log_acc / log_n:.3f} | test{' (EMA)' if ema else ''} blank acc "
                  f"{m['blank_acc']:.3f} cell acc {m['cell_acc']:.3f} exact {m['exact']:.3f} "
                  f"({m['n_exact']}/{len(test['inputs'])}) q_halt acc {m['q_halt_acc']:.3f} q_halt>0 {m['q_halt_pos']:.3f} -> {path}", flush=True)
            log_loss, log_acc, log_n = 0.0, 0.0, 0
    print(f"done: {step} optimizer steps in {time.time() - t0:.0f}s; run folder {run_dir}")


if __name__ == "__main__":
    main()
