"""Probes: the expensive model passes, run once per subject; every analysis reads their trace.

TRM probe: the upstream evaluation semantics (shared/specs/trm.md §3.4, §3.6): a fresh carry
(H_init / L_init everywhere), then exactly `halt_max_steps` ACT steps; q_halt never stops a row.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    "embedding": "[V,D] float32 token embedding table E (for other reverse-embedding methods)",
}


@dataclass
class TRMTrace:
    arrays: dict[str, np.ndarray]
    prefix_len: int

    def __getattr__(self, name):
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def steps(self) -> int:
        return self.arrays["preds"].shape[0]

    @property
    def n(self) -> int:
        return self.arrays["preds"].shape[1]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, prefix_len=np.int64(self.prefix_len), **self.arrays)

    @classmethod
    def load(cls, path: Path) -> "TRMTrace":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "prefix_len"}
            return cls(arrays=arrays, prefix_len=int(z["prefix_len"]))


def resolve_device(device: str) -> str:
    import torch

    from .errors import ReportgenError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ReportgenError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ReportgenError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device


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
              puzzle_index: np.ndarray, device: str = "cpu", batch_size: int = 256, progress=None) -> TRMTrace:
    """Run the selected puzzles through every ACT step once and keep what the analyses need."""
    import torch

    model = subject.model.to(device)
    cfg = model.cfg
    T, P, N = cfg.halt_max_steps, cfg.prefix_len, len(inputs)
    E = model.embed_tokens.embedding_weight.detach().float().cpu().numpy()  # [V, D]
    out = {k: [] for k in ("preds", "confidence", "logits", "q_halt", "q_continue", "z_H", "z_L", "z_H_tokens", "z_L_tokens")}
    with torch.inference_mode():
        for lo in range(0, N, batch_size):
            hi = min(N, lo + batch_size)
            inp = torch.as_tensor(inputs[lo:hi], device=device)
            pid = torch.as_tensor(puzzle_identifiers[lo:hi], device=device)
            x = model.input_embeddings(inp, pid)
            z_H, z_L = model.initial_carry(hi - lo, device)
            steps = {k: [] for k in out if k not in ("z_H", "z_L")}
            for t in range(T):
                z_H, z_L, logits, q_halt, q_cont = model.act_step(z_H, z_L, x)
                steps["preds"].append(logits.argmax(-1))  # on logits in the compute dtype, as upstream
                lf = logits.float()
                steps["logits"].append(lf)
                steps["confidence"].append(lf.softmax(-1).amax(-1))
                steps["q_halt"].append(q_halt)
                steps["q_continue"].append(q_cont)
                steps["z_H_tokens"].append(torch.from_numpy(reverse_embed(z_H[:, P:].float().cpu().numpy(), E)))
                steps["z_L_tokens"].append(torch.from_numpy(reverse_embed(z_L[:, P:].float().cpu().numpy(), E)))
                if progress:
                    progress(t + 1, T)
            for k, v in steps.items():
                out[k].append(torch.stack(v).cpu())  # [T, b, ...]
            out["z_H"].append(z_H.float().cpu())
            out["z_L"].append(z_L.float().cpu())
    cat = {k: torch.cat(v, dim=0 if k in ("z_H", "z_L") else 1).numpy() for k, v in out.items()}
    halted = np.zeros((T, N), dtype=bool)
    halted[-1] = True  # eval semantics: steps >= halt_max_steps only at the last step
    arrays = {
        "inputs": inputs.astype(np.int32),
        "labels": labels.astype(np.int32),
        "puzzle_index": puzzle_index.astype(np.int64),
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
        "embedding": E,
    }
    return TRMTrace(arrays=arrays, prefix_len=P)
