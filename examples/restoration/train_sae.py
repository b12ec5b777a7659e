"""Train the example SAE with SAELens on one layer of the example restoration model, offline.

The model is loaded the way reportgen loads it (seed-004 checkpoint -> HookedTransformer, no weight
processing), the training text is cut into 128-byte windows and masked like reportgen's probe input
(15 % of positions -> [MASK], seeded), and SAELens' own runner trains a TopK SAE on
blocks.<layer>.hook_resid_post. The result is written in SAELens' on-disk layout.

    OMP_NUM_THREADS=2 python examples/restoration/train_sae.py
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(HERE / "checkpoints/restoration_bytes/step_800.pt"))
    ap.add_argument("--data", default=str(HERE / "data/train.txt"))
    ap.add_argument("--out", default=str(HERE / "sae/blocks.2.hook_resid_post"))
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=600_000, help="training tokens")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from reportgen.models.lm import load_model, read_checkpoint, sniff
    from reportgen.data.tokens import mask_tokens
    from reportgen.sae import train_sae

    ckpt = Path(args.ckpt)
    obj = read_checkpoint(ckpt)
    model, _, _, _ = load_model(ckpt, obj, sniff(obj), "cpu")
    raw = np.frombuffer(Path(args.data).read_bytes(), dtype=np.uint8).astype(np.int64)
    n = min(len(raw) // 128, -(-args.tokens // 128))
    tokens = raw[: n * 128].reshape(n, 128)
    inputs, _ = mask_tokens(tokens, 0.15, 257, args.seed, protect=(256,))
    t0 = time.perf_counter()
    sae, info = train_sae(model, inputs, args.layer, Path(args.out), "cpu", arch="topk", training_tokens=args.tokens,
                          expansion=args.expansion, k=args.k, seed=args.seed, label="restoration_bytes/step_800")
    print(f"trained {info['architecture']} d_sae={info['d_sae']} on {info['hook']} from {n} windows "
          f"in {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
