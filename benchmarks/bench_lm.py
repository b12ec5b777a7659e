"""Language-model benchmark (1 thread): the token map, and the seed-004 model at its real size end to end.

Prints, on the example restoration model (the SAE feature pages have their own, benchmarks/bench_sae.py):
  token map  a 50x50 grid: its forward passes, and the time beyond them (compute + figure + files; target <= 0.5 s).
Medians of --repeat runs, alternated so that drift on a shared machine hits both sides alike.

Then the seed-004 model at its real size (37M parameters: 16 layers, d_model 384, 8 heads, vocab 11812,
context 768) with random weights, written by this script in the seed's checkpoint format, built end to end
with `reportgen build` (the `lm` kind, every LM analysis, HTML and PDF) over 256x128 and 64x768 tokens in a
child process each: wall time and the child's peak RSS (target <= 3 GB at 64x768 under --max-memory 2GiB).

    python benchmarks/bench_lm.py              # both parts
    python benchmarks/bench_lm.py --real-only  # only the real-size builds
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "restoration"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(EX / "checkpoints/restoration_bytes/step_800.pt"))
    ap.add_argument("--sae", default=str(EX / "sae/blocks.2.hook_resid_post"))
    ap.add_argument("--data", default=str(EX / "data/eval.txt"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--real-only", action="store_true", help="only the real-size seed-004 builds")
    ap.add_argument("--max-memory", default="2GiB", help="--max-memory of the real-size builds")
    args = ap.parse_args()
    if not args.real_only:
        small(args)
    real_size(args)


def small(args) -> None:
    import torch

    torch.set_num_threads(1)
    import analyses.token_map as TM
    from reportgen.figures import save
    from reportgen.models.lm import load_model, read_checkpoint, sniff
    from reportgen.data.tokens import load_tokens, load_vocab, mask_tokens
    from reportgen.probes.lm import run_from_layer

    ckpt = Path(args.ckpt)
    obj = read_checkpoint(ckpt)
    model, causal, rows, _ = load_model(ckpt, obj, sniff(obj), "cpu")
    vocab, src, byte_level = load_vocab(None, ckpt, model.cfg.d_vocab)
    tokens = load_tokens(Path(args.data), vocab, byte_level, model.cfg.d_vocab, 128, 256)
    inputs, scored = mask_tokens(tokens, 0.15, 257, 0, protect=(256,))
    print(f"model {ckpt.name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; 1 thread "
          f"(the SAE feature pages: benchmarks/bench_sae.py)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-"))

    tp = TM.Params(grid_size=50)
    need = {**TM.needs(tp)["run_from_layer"], "layer": model.cfg.n_layers - 1}
    fwd, rest = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        rf = run_from_layer(model, need, "cpu")
        t1 = time.perf_counter()
        trace = type("T", (), {"run_from": rf, "vocab": vocab, "n_layers": model.cfg.n_layers})()
        d = TM.compute(trace, tp)
        (fig,) = TM.figures(d, tp)
        save(fig, tmp / "tm", ("svg", "png"))
        rest.append(time.perf_counter() - t1)
        fwd.append(t1 - t0)
    print(f"token map 50x50: forward passes {statistics.median(fwd):.3f} s; beyond them (compute + figure + SVG/PNG) "
          f"{statistics.median(rest):.3f} s (target <= 0.5)")
    sys.stdout.flush()


SEED_004 = {"vocab_size": 11812, "max_position": 768, "d_model": 384, "n_heads": 8, "d_ff": 1536, "n_layers": 16,
            "dropout": 0.1, "rotary_base": 10000}  # shared/seeds/004: no mask token named, so --mask-id


def write_seed_checkpoint(path: Path) -> int:
    """The seed-004 model at its real size with random weights, in the seed's format; returns its parameters."""
    import torch

    from reportgen.models.restoration import RestorationConfig, expected_shapes

    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(RestorationConfig.from_dict(SEED_004))
    sd = {k: (torch.ones(s) if k.endswith("ln1.weight") or k.endswith("ln2.weight") or k == "final_ln.weight"
              else torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    torch.save({"model_state_dict": sd, "config": dict(SEED_004), "vocab_size": SEED_004["vocab_size"]}, path)
    return sum(v.numel() for v in sd.values())


def build_child(cmd: list[str], env: dict) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes of the build process tree's largest process, exit status) of one child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss (KiB): the child, or its largest waited-for descendant
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, proc.returncode


def real_size(args) -> None:
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-real-"))
    ckpt = tmp / "seed004" / "best_model.pt"
    ckpt.parent.mkdir()
    n_params = write_seed_checkpoint(ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"seed-004 real size, random weights: {n_params / 1e6:.1f}M parameters, {SEED_004['n_layers']} layers, "
          f"{SEED_004['n_heads']} heads, vocab {SEED_004['vocab_size']}; reportgen build, every LM analysis, html+pdf, "
          f"1 thread, --max-memory {args.max_memory}")
    rng = np.random.default_rng(0)
    for n, T in ((256, 128), (64, 768)):
        data = tmp / f"tokens_{n}x{T}.npy"
        np.save(data, rng.integers(5, SEED_004["vocab_size"], (n, T)).astype(np.int64))
        cmd = [sys.executable, "-m", "reportgen", "build", "--ckpt", str(ckpt), "--data", str(data), "--seq-len", str(T),
               "--max-seqs", str(n), "--eval", "all", "--mask-id", "4", "--threads", "1", "--max-memory", args.max_memory,
               "--out", str(tmp / f"site_{n}x{T}"), "--force", "-q"]
        wall, rss, rc = build_child(cmd, env)
        state = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"  {n}x{T} tokens: wall {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB {state}"
              + (" (target <= 3 GB)" if T == 768 else ""))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
