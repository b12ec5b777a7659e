"""Probes: the expensive model passes, run once per subject; every analysis reads their trace.

TRM probe: one batched pass over the evaluation puzzles that keeps compact per-puzzle arrays (EVAL_ARRAYS,
what the statistics need), and the full trace (TRACE_ARRAYS) only of the puzzles the figures draw. The upstream
evaluation semantics (shared/specs/trm.md §3.4, §3.6): a fresh carry
(H_init / L_init everywhere), then exactly `halt_max_steps` ACT steps; q_halt never stops a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# array name -> description (also rendered into the README's trace table and the report)
TRACE_ARRAYS = {
    "inputs": "[N,81] int32 input token ids (1 = blank, d+1 = digit d)",
    "labels": "[N,81] int32 target token ids",
    "puzzle_index": "[N] int64 row of each puzzle in the split",
    "preds": "[T,N,81] int32 argmax token per cell after each ACT step",
    "confidence": "[T,N,81] float32 max softmax probability per cell",
    "logits": "[T,N,81,V] float32 output logits",
    "q_halt": "[T,N] float32 q_halt logit (q_halt > 0: the model's own 'done' signal)",
    "q_continue": "[T,N] float32 q_continue logit",
    "halted": "[T,N] bool halted flag under eval semantics (True only at the last step)",
    "z_H": "[N,P+81,D] float32 z_H carry after the last step",
    "z_L": "[N,P+81,D] float32 z_L carry after the last step",
    "z_H_tokens": "[T,N,81] int32 reverse embedding argmax(z_H·Eᵀ) of the 81 cells, per step",
    "z_L_tokens": "[T,N,81] int32 reverse embedding argmax(z_L·Eᵀ) of the 81 cells, per step",
    "z_L_lens_tokens": "[T,N,81] int32 logit lens argmax(lm_head(z_L)) of the 81 cells, per step (lm_head(z_H) is preds)",
    "embedding": "[V,D] float32 token embedding table E (for other reverse-embedding methods)",
}
from .trm_cycles import CYCLE_EVAL_ARRAYS, CYCLE_TRACE_ARRAYS  # noqa: E402 - the recursion analysis' arrays

TRACE_ARRAYS.update(CYCLE_TRACE_ARRAYS)


class _Arrays:
    """Named arrays readable as attributes (trace.preds is trace.arrays["preds"]); `STEPS` names a [T, N, ...]
    array that gives the number of ACT steps and of puzzles."""

    STEPS = "preds"

    @property
    def steps(self) -> int:
        return self.arrays[self.STEPS].shape[0]

    @property
    def n(self) -> int:
        return self.arrays[self.STEPS].shape[1]

    def __getattr__(self, name):
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class TRMTrace(_Arrays):
    """The full trace of the drawn puzzles (figures), and `eval`: the evaluation set's compact arrays (metrics)."""

    arrays: dict[str, np.ndarray]
    prefix_len: int
    eval: EvalSet | None = None

    def save(self, path: Path) -> None:
        np.savez_compressed(path, prefix_len=np.int64(self.prefix_len), **self.arrays)

    @classmethod
    def load(cls, path: Path) -> "TRMTrace":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "prefix_len"}
            return cls(arrays=arrays, prefix_len=int(z["prefix_len"]))


# array name -> description of the evaluation arrays (data/eval.npz): what the statistics need, per puzzle
EVAL_ARRAYS = {
    "puzzle_index": "[N] int64 row of each evaluated puzzle in the split",
    "blank": "[N,81] bool cell left blank by the puzzle",
    "blanks": "[N] int16 blank cells per puzzle",
    "candidates": "[N,81] int8 digits a blank cell could hold given the clues (none in its row, column or box); 0 at a clue",
    "correct_blank": "[T,N] int16 blank cells predicted right after each ACT step",
    "solved": "[T,N] bool all 81 cells right after each ACT step",
    "changed": "[T,N] int16 cells whose prediction differs from the previous step (0 at step 1)",
    "q_halt": "[T,N] float32 q_halt logit",
    "confidence_right": "[T,N] float32 sum of the confidence of the right blank cells",
    "confidence_wrong": "[T,N] float32 sum of the confidence of the wrong blank cells",
    "correct_last": "[N,81] bool cell right after the last step",
    "confidence_last": "[N,81] float32 max softmax probability per cell after the last step",
    "cell_changes": "[N,81] int16 times each cell's prediction changed over the steps",
    "z_H_match": "[N] int16 cells whose reverse-embedded z_H (dot) equals the target after the last step",
    "z_L_match": "[N] int16 the same for z_L",
}

FROM_INPUTS = ("puzzle_index", "blank", "blanks", "candidates")  # evaluation arrays made from the puzzles alone
PER_STEP = ("correct_blank", "solved", "changed", "q_halt", "confidence_right", "confidence_wrong")  # [T, N]

# --eval all: the whole split, up to a cap. On a GPU the cap covers the whole Sudoku-Extreme test split; on a CPU it is the number of puzzles of about 3e13 FLOP (roughly 10 minutes at ~50 GFLOP/s;
# the whole split of the shipped example; 65 puzzles of 457 GFLOP at the real TRM size), never under 50 puzzles.
EVAL_CAP_CUDA = 500_000
EVAL_CPU_FLOP = 3e13
EVAL_CAP_CPU_MIN = 50


@dataclass
class EvalSet(_Arrays):
    """Compact per-puzzle arrays of the evaluation pass (EVAL_ARRAYS): every metric is computed from these."""

    STEPS = "solved"

    arrays: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)  # how the puzzles were chosen (split size, cap), for the report

    def head(self, n: int) -> "EvalSet":
        """The first n puzzles ([T,N] arrays are cut on their second axis, [T,C,N] ones on their third)."""
        from .trm_cycles import PER_CYCLE

        def cut(k, v):
            if k in PER_CYCLE:
                return v[:, :, :n]
            if k in PER_STEP or k in ("violations", "z_H_mean"):
                return v[:, :n]
            return v if k == "cycle_update" else v[:n]
        return EvalSet({k: cut(k, v) for k, v in self.arrays.items()}, dict(self.info))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **self.arrays)

    @classmethod
    def load(cls, path: Path) -> "EvalSet":
        with np.load(path, allow_pickle=False) as z:
            return cls(arrays={k: z[k] for k in z.files})


def trm_flops(cfg, batch: int = 1) -> float:
    """Multiply-adds x2 of every matmul in halt_max_steps ACT steps (linear layers, attention, heads)."""
    from ..models.trm import inner_width

    D, L, S, V = cfg.hidden_size, cfg.total_len, cfg.seq_len, cfg.vocab_size
    I = inner_width(cfg.expansion, D)
    tok = batch * L
    block = 2 * tok * D * (3 * D) + 2 * tok * D * D + 2 * tok * D * 2 * I + 2 * tok * I * D  # qkv, o, up, down
    block += 2 * 2 * batch * L * L * D  # QK^T and AV over all heads
    passes = cfg.H_cycles * (cfg.L_cycles + 1) * cfg.L_layers
    heads = 2 * batch * S * D * V + 2 * batch * D * 2
    return cfg.halt_max_steps * (passes * block + heads)


def eval_cap(cfg, device: str) -> int:
    """How many puzzles --eval all evaluates at most on this device."""
    if device == "cuda":
        return EVAL_CAP_CUDA
    return max(EVAL_CAP_CPU_MIN, int(EVAL_CPU_FLOP // trm_flops(cfg)))


def eval_batch_size(cfg, budget: int) -> int:
    """Puzzles per batch whose activations fit in `budget` bytes (a generous estimate of one ACT step's
    live tensors: carries, attention scores, SwiGLU, logits and softmax)."""
    from ..models.trm import inner_width

    L, D, I = cfg.total_len, cfg.hidden_size, inner_width(cfg.expansion, cfg.hidden_size)
    per_puzzle = 4 * (L * (12 * D + 4 * I) + 3 * cfg.num_heads * L * L + 4 * cfg.seq_len * cfg.vocab_size)
    return int(max(1, min(4096, budget // per_puzzle)))


def reverse_embed(z: np.ndarray, E: np.ndarray, method: str = "dot") -> np.ndarray:
    """Nearest token of each latent vector z[..., D] against the embedding table E [V, D]:
    argmax(z·Eᵀ) ("dot", the trace's definition) or argmax of cosine similarity ("cosine")."""
    if method == "cosine":
        z = z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
        E = E / (np.linalg.norm(E, axis=-1, keepdims=True) + 1e-12)
    elif method != "dot":
        raise ValueError(f"reverse embedding method must be dot or cosine, not {method!r}")
    return (z @ E.T).argmax(-1)


def probe_trm(subject, inputs: np.ndarray, labels: np.ndarray, puzzle_identifiers: np.ndarray,
              puzzle_index: np.ndarray, device: str = "cpu", batch_size: int = 256, progress=None,
              cycles: str | None = None) -> TRMTrace:
    """Run the selected puzzles through every ACT step once and keep the full trace of each."""
    _, trace = run_trm(subject, inputs, labels, puzzle_identifiers, puzzle_index, np.ones(len(inputs), bool), device,
                       batch_size, progress, cycles)
    return trace


def run_trm(subject, inputs: np.ndarray, labels: np.ndarray, puzzle_identifiers: np.ndarray, puzzle_index: np.ndarray,
            keep: np.ndarray, device: str = "cpu", batch_size: int = 256, progress=None,
            cycles: str | None = None) -> tuple[EvalSet, TRMTrace]:
    """One pass over the given puzzles, in batches: the compact evaluation arrays (EVAL_ARRAYS) of every
    puzzle, and the full trace (TRACE_ARRAYS) of the puzzles where `keep` is True, in their order. With
    `cycles` "H" or "L", also the latents inside each step (probes/trm_cycles.py: CYCLE_TRACE_ARRAYS of the
    kept puzzles, CYCLE_EVAL_ARRAYS of all)."""
    import torch

    from .trm_cycles import CycleCapture, finish_eval, finish_trace

    model = subject.model.to(device)
    cfg = model.cfg
    T, P, N = cfg.halt_max_steps, cfg.prefix_len, len(inputs)
    E = model.embed_tokens.embedding_weight.detach().float().cpu().numpy()  # [V, D]
    full = {k: [] for k in ("preds", "confidence", "logits", "q_halt", "q_continue", "z_H", "z_L", "z_H_tokens", "z_L_tokens",
                            "z_L_lens_tokens")}
    W = model.lm_head.weight.detach().float()  # [V, D]: the logit lens on z_L
    compact = {k: [] for k in EVAL_ARRAYS if k not in FROM_INPUTS}  # per batch
    cyc_eval, cyc_full, update = [], [], []
    with torch.inference_mode():
        for lo in range(0, N, batch_size):
            hi = min(N, lo + batch_size)
            inp = torch.as_tensor(inputs[lo:hi], device=device)
            lab = torch.as_tensor(labels[lo:hi], device=device)
            pid = torch.as_tensor(puzzle_identifiers[lo:hi], device=device)
            kept = torch.as_tensor(np.flatnonzero(keep[lo:hi]), device=device)
            blank = inp == 1
            x = model.input_embeddings(inp, pid)
            z_H, z_L = model.initial_carry(hi - lo, device)
            steps = {k: [] for k in full if k not in ("z_H", "z_L")}
            preds, confs, q_halts, means = [], [], [], []
            cap = CycleCapture(model, cycles, z_H, z_L, lab, blank, kept) if cycles else None
            for t in range(T):
                if cap is not None:
                    cap.begin_step()
                z_H, z_L, logits, q_halt, q_cont = model.act_step(z_H, z_L, x, cap)
                if cap is not None:
                    means.append(z_H[:, P:].float().mean(1))
                pred = logits.argmax(-1)  # on logits in the compute dtype, as upstream
                lf = logits.float()
                conf = lf.softmax(-1).amax(-1)
                preds.append(pred)
                confs.append(conf)
                q_halts.append(q_halt.float())
                if len(kept):
                    steps["preds"].append(pred[kept])
                    steps["logits"].append(lf[kept])
                    steps["confidence"].append(conf[kept])
                    steps["q_halt"].append(q_halt[kept])
                    steps["q_continue"].append(q_cont[kept])
                    steps["z_H_tokens"].append(torch.from_numpy(reverse_embed(z_H[kept, P:].float().cpu().numpy(), E)))
                    steps["z_L_tokens"].append(torch.from_numpy(reverse_embed(z_L[kept, P:].float().cpu().numpy(), E)))
                    steps["z_L_lens_tokens"].append((z_L[kept, P:].float() @ W.T).argmax(-1).cpu())
            last_tokens = [torch.from_numpy(reverse_embed(z[:, P:].float().cpu().numpy(), E)) for z in (z_H, z_L)]
            for k, v in compact_arrays(torch.stack(preds), torch.stack(confs), torch.stack(q_halts), lab, blank,
                                       *last_tokens).items():
                compact[k].append(v.cpu())
            if cap is not None:
                update = cap.update
                cyc_eval.append(cap.batch_eval(torch.stack(preds), torch.stack(means)))
                if len(kept):
                    cyc_full.append(cap.batch_full())
            if len(kept):
                for k, v in steps.items():
                    full[k].append(torch.stack(v).cpu())  # [T, kept, ...]
                full["z_H"].append(z_H[kept].float().cpu())
                full["z_L"].append(z_L[kept].float().cpu())
            if progress:
                progress(hi, N)
    evalset = _evalset({k: torch.cat(v, dim=1 if k in PER_STEP else 0).numpy() for k, v in compact.items()},
                       inputs, puzzle_index)
    if cyc_eval:
        evalset.arrays.update(finish_eval(cyc_eval, update))

    k = keep.astype(bool)
    if not full["preds"]:
        return evalset, None
    cat = {n: torch.cat(v, dim=0 if n in ("z_H", "z_L") else 1).numpy() for n, v in full.items()}
    halted = np.zeros((T, int(k.sum())), dtype=bool)
    halted[-1] = True  # eval semantics: steps >= halt_max_steps only at the last step
    arrays = {
        "inputs": inputs[k].astype(np.int32),
        "labels": labels[k].astype(np.int32),
        "puzzle_index": puzzle_index[k].astype(np.int64),
        "preds": cat["preds"].astype(np.int32),
        "confidence": cat["confidence"].astype(np.float32),
        "logits": cat["logits"].astype(np.float32),
        "q_halt": cat["q_halt"].astype(np.float32),
        "q_continue": cat["q_continue"].astype(np.float32),
        "halted": halted,
        "z_H": cat["z_H"],
        "z_L": cat["z_L"],
        "z_H_tokens": cat["z_H_tokens"].astype(np.int32),
        "z_L_tokens": cat["z_L_tokens"].astype(np.int32),
        "z_L_lens_tokens": cat["z_L_lens_tokens"].astype(np.int32),
        "embedding": E,
    }
    if cyc_full:
        arrays.update(finish_trace(cyc_full, update))
    return evalset, TRMTrace(arrays=arrays, prefix_len=P)


def compact_arrays(preds, conf, q_halt, labels, blank, z_H_tokens, z_L_tokens) -> dict:
    """The evaluation arrays of a batch (torch tensors, on any device): preds and conf [T, b, 81], q_halt [T, b],
    labels [b, 81], blank [b, 81] bool, z_H_tokens / z_L_tokens [b, 81] after the last step."""
    import torch

    right = preds == labels[None]  # [T, b, 81]
    rb = right & blank[None]
    diff = torch.zeros_like(right)
    diff[1:] = preds[1:] != preds[:-1]
    return {
        "correct_blank": rb.sum(-1),
        "solved": right.all(-1),
        "changed": diff.sum(-1),
        "q_halt": q_halt.float(),
        "confidence_right": (conf * rb).sum(-1),
        "confidence_wrong": (conf * (~right & blank[None])).sum(-1),
        "correct_last": right[-1],
        "confidence_last": conf[-1],
        "cell_changes": diff.sum(0),
        "z_H_match": (z_H_tokens.to(labels.device) == labels).sum(-1),
        "z_L_match": (z_L_tokens.to(labels.device) == labels).sum(-1),
    }


_EVAL_DTYPES = {"correct_blank": np.int16, "solved": bool, "changed": np.int16, "q_halt": np.float32,
                "confidence_right": np.float32, "confidence_wrong": np.float32, "correct_last": bool,
                "confidence_last": np.float32, "cell_changes": np.int16, "z_H_match": np.int16, "z_L_match": np.int16}


def _evalset(compact: dict, inputs: np.ndarray, puzzle_index: np.ndarray) -> EvalSet:
    ev = {k: v.astype(_EVAL_DTYPES[k]) for k, v in compact.items()}
    ev["puzzle_index"] = puzzle_index.astype(np.int64)
    ev["blank"] = inputs == 1
    ev["blanks"] = ev["blank"].sum(-1).astype(np.int16)
    ev["candidates"] = candidates(inputs)
    return EvalSet(arrays={k: ev[k] for k in EVAL_ARRAYS})


def candidates(inputs: np.ndarray) -> np.ndarray:
    """[N,81] int8: for each blank cell (token 1) the number of digits 1-9 that no clue in its row, column or
    3x3 box holds (token d+1 is digit d); 0 at a clue. A local measure of how hard a blank cell is."""
    x = np.asarray(inputs).reshape(-1, 9, 9)
    given = np.zeros(x.shape + (9,), dtype=bool)  # [N, r, c, digit]
    d = x.astype(np.int64) - 2
    ok = (d >= 0) & (d < 9)
    n, r, c = np.nonzero(ok)
    given[n, r, c, d[ok]] = True
    rows, cols = given.any(2), given.any(1)  # [N, r, d], [N, c, d]
    boxes = given.reshape(-1, 3, 3, 3, 3, 9).any((2, 4))  # [N, br, bc, d]
    seen = rows[:, :, None, :] | cols[:, None, :, :] | np.repeat(np.repeat(boxes, 3, 1), 3, 2)
    out = (~seen).sum(-1).astype(np.int8)
    out[x != 1] = 0
    return out.reshape(len(x), 81)


def evalset_from_trace(trace: TRMTrace) -> EvalSet:
    """The evaluation arrays of a full trace's puzzles (the same reduction as the evaluation pass)."""
    import torch

    t = {k: torch.from_numpy(np.asarray(trace.arrays[k])) for k in
         ("preds", "confidence", "q_halt", "labels", "inputs", "z_H_tokens", "z_L_tokens")}
    c = compact_arrays(t["preds"], t["confidence"], t["q_halt"], t["labels"], t["inputs"] == 1, t["z_H_tokens"][-1],
                       t["z_L_tokens"][-1])
    return _evalset({k: v.numpy() for k, v in c.items()}, trace.inputs, trace.puzzle_index)
