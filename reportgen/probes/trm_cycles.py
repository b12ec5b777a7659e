"""Per-cycle capture inside each TRM ACT step (the `recursion` analysis asks for it).

`run_trm(..., cycles="H")` records z_H and z_L after every H cycle of every ACT step (C = H_cycles entries
per step); `cycles="L"` after every update of either latent, in the order they happen (C = H_cycles ×
(L_cycles + 1): L_cycles z_L updates, then the z_H update, per H cycle). The last entry of a step is always
that step's carry. The drawn puzzles keep the full latents (CYCLE_TRACE_ARRAYS); every evaluated puzzle keeps
only small per-cycle reductions (CYCLE_EVAL_ARRAYS): logit-lens accuracy, reverse-embedding/lens agreement,
relative change of each latent, plus per step the rule violations of the predicted board and z_H's mean
over the cells (for a projection of the trajectory).
"""
from __future__ import annotations

import numpy as np

CYCLE_TRACE_ARRAYS = {
    "cycle_update": "[C] int8 which latent the update ending cycle c changed (1 = z_H: an H cycle ends, 0 = z_L); "
                    "C = H_cycles (--param recursion.cycles=H) or H_cycles·(L_cycles+1) (cycles=L); the last "
                    "cycle of each step is that step's carry",
    "z_H_cycles": "[T,C,N,P+81,D] float32 z_H after cycle c of ACT step t",
    "z_L_cycles": "[T,C,N,P+81,D] float32 z_L after cycle c of ACT step t",
    "z_H_cycle_tokens": "[T,C,N,81] int32 reverse embedding argmax(z_H·Eᵀ) of the cells after each cycle",
    "z_L_cycle_tokens": "[T,C,N,81] int32 the same for z_L",
    "z_H_lens": "[T,C,N,81] int32 logit lens argmax(lm_head(z_H)) of the cells after each cycle",
    "z_L_lens": "[T,C,N,81] int32 logit lens argmax(lm_head(z_L)) after each cycle",
}

CYCLE_EVAL_ARRAYS = {
    "cycle_update": "[C] int8 as in the trace: 1 where cycle c ends with the z_H update",
    "lens_H_correct": "[T,C,N] int16 blank cells whose logit-lens readout of z_H is the target",
    "lens_L_correct": "[T,C,N] int16 the same for z_L",
    "rev_lens_H": "[T,C,N] int16 cells whose reverse embedding of z_H equals its logit-lens readout",
    "rev_lens_L": "[T,C,N] int16 the same for z_L",
    "delta_H": "[T,C,N] float32 ‖z_H − z_H at the previous cycle‖ / ‖z_H‖ (all P+81 positions; the first cycle "
               "against the initial carry)",
    "delta_L": "[T,C,N] float32 the same for z_L",
    "violations": "[T,N] int16 Sudoku rule violations of the predicted board after each step (extra copies of a "
                  "digit in a row, column or box, summed over the 27 units)",
    "z_H_mean": "[T,N,D] float16 z_H averaged over the 81 cells after each step",
}
PER_CYCLE = ("lens_H_correct", "lens_L_correct", "rev_lens_H", "rev_lens_L", "delta_H", "delta_L")  # [T, C, N]
_DT = {"lens_H_correct": np.int16, "lens_L_correct": np.int16, "rev_lens_H": np.int16, "rev_lens_L": np.int16,
       "delta_H": np.float32, "delta_L": np.float32, "violations": np.int16, "z_H_mean": np.float16}


def _units() -> np.ndarray:
    """[27, 9] cell indices of the 9 rows, 9 columns and 9 boxes."""
    rows = [[9 * r + c for c in range(9)] for r in range(9)]
    cols = [[9 * r + c for r in range(9)] for c in range(9)]
    boxes = [[9 * (3 * br + r) + 3 * bc + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
    return np.array(rows + cols + boxes)


UNITS = _units()


def sudoku_violations(board):
    """Rule violations of boards of token ids [..., 81] (digit d is token d+1; other tokens are ignored): for
    every row, column and box, the copies of each digit beyond the first, summed. A torch tensor or an array."""
    import torch

    is_np = isinstance(board, np.ndarray)
    b = torch.as_tensor(board)
    units = torch.as_tensor(UNITS, device=b.device)
    onehot = b[..., None] == torch.arange(2, 11, device=b.device)  # [..., 81, 9]
    counts = onehot[..., units, :].sum(-2)  # [..., 27, 9]
    v = (counts - 1).clamp(min=0).sum((-1, -2))
    return v.numpy() if is_np else v


class CycleCapture:
    """The `on_cycle` callback of TRM.act_step for one batch: call `begin_step()` before each step."""

    def __init__(self, model, mode: str, z_H0, z_L0, labels, blank, kept):
        import torch

        if mode not in ("H", "L"):
            raise ValueError(f"cycles must be H or L, not {mode!r}")
        cfg = model.cfg
        self.mode, self.P, self.kept, self.labels, self.blank = mode, cfg.prefix_len, kept, labels, blank
        self.W = model.lm_head.weight.detach().float()  # [V, D]
        self.E = model.embed_tokens.embedding_weight.detach().float()
        self.prev = {"H": z_H0.float(), "L": z_L0.float()}
        self.update = [1 if lvl == "H" else 0 for lvl in self.levels(cfg)]
        self.ev = {k: [] for k in PER_CYCLE}  # per step: lists over cycles of [b]
        self.full = {k: [] for k in ("z_H_cycles", "z_L_cycles", "z_H_cycle_tokens", "z_L_cycle_tokens", "z_H_lens",
                                     "z_L_lens")}
        self.torch = torch

    def levels(self, cfg) -> list[str]:
        per_h = (["L"] * cfg.L_cycles + ["H"]) if self.mode == "L" else ["H"]
        return per_h * cfg.H_cycles

    def begin_step(self) -> None:
        for d in (self.ev, self.full):
            for v in d.values():
                v.append([])

    def __call__(self, level: str, z_H, z_L) -> None:
        if self.mode == "H" and level == "L":
            return
        torch, P, lab, blank = self.torch, self.P, self.labels, self.blank
        for name, z in (("H", z_H), ("L", z_L)):
            zf = z.float()
            diff = (zf - self.prev[name]).flatten(1).norm(dim=1) / zf.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.prev[name] = zf
            cells = zf[:, P:]
            lens = (cells @ self.W.T).argmax(-1)  # [b, 81]
            rev = (cells @ self.E.T).argmax(-1)
            self.ev[f"delta_{name}"][-1].append(diff)
            self.ev[f"lens_{name}_correct"][-1].append(((lens == lab) & blank).sum(-1))
            self.ev[f"rev_lens_{name}"][-1].append((lens == rev).sum(-1))
            if len(self.kept):
                k = self.kept
                self.full[f"z_{name}_cycles"][-1].append(zf[k].cpu())
                self.full[f"z_{name}_cycle_tokens"][-1].append(rev[k].cpu())
                self.full[f"z_{name}_lens"][-1].append(lens[k].cpu())

    def batch_eval(self, preds, z_H_means) -> dict:
        """This batch's CYCLE_EVAL_ARRAYS (torch, CPU): preds [T, b, 81], z_H_means [T, b, D]."""
        torch = self.torch
        out = {k: torch.stack([torch.stack(c) for c in v]).cpu() for k, v in self.ev.items()}  # [T, C, b]
        out["violations"] = sudoku_violations(preds).cpu()
        out["z_H_mean"] = z_H_means.cpu()
        return out

    def batch_full(self) -> dict:
        """This batch's kept rows: [T, C, k, ...] tensors (empty dict when no row is kept)."""
        torch = self.torch
        if not len(self.kept):
            return {}
        return {k: torch.stack([torch.stack(c) for c in v]) for k, v in self.full.items()}


def finish_eval(parts: list[dict], update: list[int]) -> dict:
    import torch

    out = {k: torch.cat([p[k] for p in parts], dim=2 if k in PER_CYCLE else 1).numpy().astype(_DT[k])
           for k in parts[0]}
    out["cycle_update"] = np.array(update, np.int8)
    return out


def finish_trace(parts: list[dict], update: list[int]) -> dict:
    import torch

    out = {k: torch.cat([p[k] for p in parts], dim=2).numpy() for k in parts[0]}
    out = {k: v.astype(np.float32 if k.endswith("_cycles") else np.int32) for k, v in out.items()}
    out["cycle_update"] = np.array(update, np.int8)
    return out
