"""Write tests/data/trm_upstream_bf16_cpu.npz: upstream's own TRM code run in bfloat16 on CPU on the
upstream fixture (shared/fixtures/trm-upstream), every ACT step.

The fixture's `step_400_all_preds.0` was written by a float32 run, so it cannot show whether our
bfloat16 forward casts where upstream casts; this file can. It is made by importing the model classes
of a TinyRecursiveModels checkout (nothing of it is copied here) and running the ACT wrapper in eval
mode, batch 32, as upstream's `evaluate()` does:

    OMP_NUM_THREADS=1 python tests/make_trm_upstream_bf16.py --upstream /path/to/TinyRecursiveModels

(needs einops and pydantic, which upstream's model files import). Besides the per-step predictions and
q logits it stores a fingerprint of this machine's bfloat16 matmul and attention kernels at the
fixture's shapes, so a test on another machine can tell "kernels round differently" from "casts moved".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from conftest import UPSTREAM

REFERENCE = Path(__file__).resolve().parent / "data" / "trm_upstream_bf16_cpu.npz"
RUN = UPSTREAM / "checkpoints" / "pretrain_att_sudoku_mini"
DATA = UPSTREAM / "data" / "sudoku-mini-aug-3"


def sha256(t) -> str:
    """Hash of a tensor's bytes (bfloat16 viewed as int16, so the exact bits count)."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def kernel_fingerprint() -> str:
    """Hash of bfloat16 linear layers, attention and SiLU and of a float32 rms on fixed inputs at the
    fixture's shapes (B 64, L 97, D 64, 2 heads, SwiGLU 256): equal on two machines when the kernels
    the forward uses round alike."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 97, 64, generator=g).bfloat16()
    h = torch.randn(64, 97, 256, generator=g).bfloat16()
    q, k, v = (torch.randn(64, 2, 97, 32, generator=g).bfloat16() for _ in range(3))
    outs = [F.linear(x, torch.randn(n, 64, generator=g).bfloat16()) for n in (192, 512, 64, 11)]
    outs.append(F.linear(h, torch.randn(64, 256, generator=g).bfloat16()))
    outs.append(F.scaled_dot_product_attention(q, k, v))
    outs += [F.silu(h), torch.rsqrt(x.float().square().mean(-1) + 1e-5)]  # SwiGLU, rms_norm
    return hashlib.sha256("".join(sha256(o) for o in outs).encode()).hexdigest()


def main() -> None:
    import torch
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a TinyRecursiveModels checkout")
    ap.add_argument("--out", type=Path, default=REFERENCE)
    args = ap.parse_args()
    sys.path.insert(0, str(args.upstream))
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    torch.set_num_threads(1)
    batch_size = 32  # upstream's global_batch_size for this run
    arch = yaml.safe_load((RUN / "all_config.yaml").read_text())["arch"]
    meta = json.loads((DATA / "train" / "dataset.json").read_text())
    cfg = {k: v for k, v in arch.items() if k not in ("name", "loss")}
    cfg.update(forward_dtype="bfloat16", batch_size=batch_size, seq_len=meta["seq_len"],
               vocab_size=meta["vocab_size"], num_puzzle_identifiers=meta["num_puzzle_identifiers"])
    model = TinyRecursiveReasoningModel_ACTV1(cfg)
    sd = torch.load(RUN / "step_400", weights_only=True, map_location="cpu")
    model.inner.load_state_dict({k.removeprefix("_orig_mod.model.inner."): v for k, v in sd.items()}, strict=True)
    model.eval()
    inputs = torch.from_numpy(np.load(DATA / "test" / "all__inputs.npy").astype(np.int32))
    pids = torch.from_numpy(np.load(DATA / "test" / "all__puzzle_identifiers.npy").astype(np.int32))
    steps = []  # per batch: per step (logits, q_halt, q_continue)
    with torch.inference_mode():
        for lo in range(0, len(inputs), batch_size):
            batch = {"inputs": inputs[lo:lo + batch_size], "puzzle_identifiers": pids[lo:lo + batch_size]}
            carry = model.initial_carry(batch)
            per = []
            for _ in range(cfg["halt_max_steps"]):
                carry, out = model(carry, batch)
                per.append((out["logits"], out["q_halt_logits"], out["q_continue_logits"]))
            steps.append(per)
    T = cfg["halt_max_steps"]
    logits = [torch.cat([b[t][0] for b in steps]) for t in range(T)]  # [N, S, V] bfloat16
    np.savez_compressed(
        args.out,
        preds=np.stack([lg.argmax(-1).numpy() for lg in logits]).astype(np.uint8),  # [T, N, S]
        q_halt=np.stack([torch.cat([b[t][1] for b in steps]).numpy() for t in range(T)]),  # [T, N] float32
        q_continue=np.stack([torch.cat([b[t][2] for b in steps]).numpy() for t in range(T)]),
        logits_sha256=np.array([sha256(lg) for lg in logits]),
        logits_dtype=np.array(str(logits[0].dtype)),
        kernel_fingerprint=np.array(kernel_fingerprint()),
        torch_version=np.array(torch.__version__),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
