"""Language-model benchmark (1 thread): the SAE feature report against the cost of running the model once.

Prints, on the example restoration model and its SAE over 256 x 128 evaluation tokens:
  floor   one forward pass with the SAE encoding the hooked activations (nothing can be faster);
  data    the probe pass that sae_features needs + its statistics for 32 features, as a multiple of the floor
          (target <= 1.05x); the pass stops after the SAE's layer (the model's later layers are not needed)
          except on the sequences of the spliced-in loss; also printed: the same with logits everywhere;
  full    data + figures (SVG and PNG written) + the section's HTML, as a multiple of the floor (target <= 1.1x);
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
    import analyses.sae_features as SF
    import analyses.token_map as TM
    from reportgen.figures import save
    from reportgen.models.lm import LMSubject, load_model, read_checkpoint, sniff
    from reportgen.data.tokens import load_tokens, load_vocab, mask_tokens
    from reportgen.probes.lm import probe_lm, run_from_layer
    from reportgen.render import environment
    from reportgen.sae import load_sae

    ckpt = Path(args.ckpt)
    obj = read_checkpoint(ckpt)
    model, causal, rows, _ = load_model(ckpt, obj, sniff(obj), "cpu")
    vocab, src, byte_level = load_vocab(None, ckpt, model.cfg.d_vocab)
    tokens = load_tokens(Path(args.data), vocab, byte_level, model.cfg.d_vocab, 128, 256)
    inputs, scored = mask_tokens(tokens, 0.15, 257, 0, protect=(256,))
    sae, info = load_sae(Path(args.sae), model, "cpu")
    hook = info["hook"]
    subject = LMSubject(ref=None, model=model, format="restoration", causal=causal, config_rows=rows, vocab=vocab,
                        vocab_source=src, byte_level=byte_level, mask_id=257, pad_id=256)
    params = SF.Params(n_features=32)
    print(f"model {ckpt.name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; SAE {info['architecture']} "
          f"{info['d_in']}->{info['d_sae']} at {hook}; tokens {tokens.shape[0]}x{tokens.shape[1]}; 1 thread")

    def floor():
        def enc(x, hook):
            sae.encode(x.reshape(-1, x.shape[-1]))

        with torch.inference_mode():
            for lo in range(0, len(inputs), 32):
                model.run_with_hooks(torch.as_tensor(inputs[lo:lo + 32]), fwd_hooks=[(hook, enc)])

    def data():
        tr = probe_lm(subject, tokens, inputs, scored, SF.needs(params), "cpu", sae=sae)
        return tr, SF.compute(tr, params)

    def data_full():  # the same with logits for every sequence, as when predictions run in the same report
        tr = probe_lm(subject, tokens, inputs, scored, {**SF.needs(params), "logits": {"top_k": 5}}, "cpu", sae=sae)
        return tr, SF.compute(tr, params)

    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-"))

    def full():
        tr, d = data()
        figs = SF.figures(d, params)
        src_map = {}
        for i, f in enumerate(figs):
            f.number, f.stem = i + 1, f"01-sae_features-{i + 1}"
            f.files = {"svg": f"figures/{f.stem}.svg", "png": f"figures/{f.stem}.png"}
            f.width, f.height = int(f.drawing.width), int(f.drawing.height)
            save(f, tmp / f.stem, ("svg", "png"))
            src_map[f.stem] = f.files["svg"]
        html = environment().get_template("partials/sae_features.html").render(
            s={"data": d, "figures": figs}, src=src_map, links=True)
        (tmp / "section.html").write_text(html)
        return len(html)

    floor(), data(), full(), data_full()  # warm up (first calls allocate and import)
    t = {"floor": [], "data": [], "full": [], "data_full": []}
    for _ in range(args.repeat):
        for name, fn in (("floor", floor), ("data", data), ("full", full), ("data_full", data_full)):
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"floor (forward + SAE encode, 256x128 tokens): {med['floor']:.3f} s")
    print(f"sae_features data, 32 features:               {med['data']:.3f} s = {med['data'] / med['floor']:.3f}x floor (target <= 1.05)")
    print(f"sae_features data + figures + HTML:           {med['full']:.3f} s = {med['full'] / med['floor']:.3f}x floor (target <= 1.10)")
    print(f"  (data alone stops after the SAE's layer except on the {params.loss_seqs} loss sequences; with logits for "
          f"every sequence, as with predictions on: {med['data_full']:.3f} s = {med['data_full'] / med['floor']:.3f}x floor)")

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
