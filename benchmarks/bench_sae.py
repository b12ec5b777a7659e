"""SAE feature-page benchmark, 1 thread, in one run:

1. floor: one forward pass of the example restoration model over 256 x 128 evaluation tokens with its SAE
   (TopK, 512 features) encoding the hooked activations; nothing that reads the SAE's codes can be faster.
   Measured warm (after one untimed pass), with the allocator tuned as `reportgen build` tunes its own
   (`reportgen.heap.reuse_freed_memory`).
2. all 512 features of the example SAE (every live one gets a card: --param sae_features.n_features=512,
   rank_by=mean), built by `reportgen build` in a child process with --timings: data (probe + statistics)
   + figures + HTML as a multiple of the floor (target <= 1.5x): the median of the ratios of each build to the
   floor measured just before it (the machine's load drifts; a ratio of neighbours is steadier than a ratio of
   medians), with their range; the PDF (target <= 5 s); the page's size (target <= 2.5 MB). Medians of
   --repeat builds, alternated with the floor.
3. a 16k-feature TopK SAE (random, made here, k=32) on the same hook over 1M tokens (the Python standard
   library's sources as bytes, 7,813 x 128): the floor and the report's data + figures + HTML, each in a
   child process: wall time (as a multiple of the floor) and the child's peak RSS.

    python benchmarks/bench_sae.py               # all three
    python benchmarks/bench_sae.py --skip-wide   # 1 and 2 only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "restoration"
CKPT = EX / "checkpoints/restoration_bytes/step_800.pt"
SAE = EX / "sae/blocks.2.hook_resid_post"
DATA = EX / "data/eval.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-wide", action="store_true", help="leave out the 16k-feature SAE over 1M tokens")
    ap.add_argument("--wide-tokens", type=int, default=1_000_000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sae", default=str(SAE), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from reportgen.heap import reuse_freed_memory

    reuse_freed_memory()  # the floor's process tunes its allocator as `reportgen build` does
    if args.child:
        return child(args)
    import torch

    torch.set_num_threads(1)
    print(f"1 thread; example model {CKPT.name}, SAE {SAE.name} (TopK k=16, 512 features); 256 x 128 tokens of {DATA.name}")
    floors, builds = [], []
    out = Path(tempfile.mkdtemp(prefix="bench-sae-"))
    floor_fn = make_floor(str(SAE), None, 256)
    floor_fn()  # warm-up
    for i in range(args.repeat):
        t0 = time.perf_counter()
        floor_fn()
        floors.append(time.perf_counter() - t0)
        builds.append(build_512(out / f"site{i}"))
    floor = statistics.median(floors)
    med = {k: statistics.median(b[k] for b in builds) for k in builds[0]}
    ratios = sorted(b["total"] / f for b, f in zip(builds, floors))  # each build against the floor just before it
    print(f"floor (forward + SAE encode, 256x128 tokens): {floor:.3f} s (median of {args.repeat})")
    print(f"512 features ({med['cards']:.0f} live, each with a card): data {med['data']:.2f} s + figures {med['figures']:.2f} s "
          f"+ HTML {med['html']:.2f} s = {med['total']:.2f} s = {statistics.median(ratios):.2f}x floor (target <= 1.5; "
          f"median of the {args.repeat} build/floor pairs, {ratios[0]:.2f}-{ratios[-1]:.2f})")
    print(f"  PDF: {med['pdf']:.2f} s (target <= 5; it holds the index and the first "
          f"{med['pdf_cards']:.0f} cards, 4 contexts + 1 per interval each)")
    print(f"  page: {med['page'] / 1e6:.2f} MB (target <= 2.5)")
    sys.stdout.flush()
    if args.skip_wide:
        return
    wide(args, out)


def build_512(out: Path) -> dict:
    cmd = [sys.executable, "-m", "reportgen", "build", "-q", "--ckpt", str(CKPT), "--data", str(DATA), "--sae", str(SAE),
           "--only", "sae_features", "--eval", "256", "--max-seqs", "256", "--threads", "1", "--timings", "--out", str(out),
           "--param", "sae_features.n_features=512", "--param", "sae_features.rank_by=mean"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        sys.exit(r.stderr)
    t = json.loads(r.stderr.strip().splitlines()[-1])
    rep = out / "restoration_bytes" / "step_800"
    d = json.loads((rep / "data" / "sae_features.json").read_text())
    data = t["probe"] + t["analyses"]
    return {"data": data, "figures": t["figures"], "html": t["html"], "total": data + t["figures"] + t["html"],
            "pdf": t["pdf"], "page": (rep / "index.html").stat().st_size, "cards": len(d["features"]),
            "pdf_cards": min(d["pdf_cards"], len(d["features"]))}


def make_floor(sae_dir: str, tokens_file: str | None, n_seqs: int):
    import numpy as np
    import torch

    from reportgen.data.tokens import load_tokens, load_vocab, mask_tokens
    from reportgen.models.lm import load_model, read_checkpoint, sniff
    from reportgen.sae import load_sae

    obj = read_checkpoint(CKPT)
    model, _, _, _ = load_model(CKPT, obj, sniff(obj), "cpu")
    if tokens_file:
        tokens = np.load(tokens_file)
    else:
        vocab, _, byte_level = load_vocab(None, CKPT, model.cfg.d_vocab)
        tokens = load_tokens(DATA, vocab, byte_level, model.cfg.d_vocab, 128, n_seqs)
    inputs, _ = mask_tokens(tokens, 0.15, 257, 0, protect=(256,))
    sae, info = load_sae(Path(sae_dir), model, "cpu")
    hook = info["hook"]

    def enc(x, hook):
        sae.encode(x.reshape(-1, x.shape[-1]))

    def run():
        with torch.inference_mode():
            for lo in range(0, len(inputs), 32):
                model.run_with_hooks(torch.as_tensor(inputs[lo:lo + 32]), fwd_hooks=[(hook, enc)])
    return run


def wide(args, out: Path) -> None:
    import numpy as np
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    folder = out / "sae16k"
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=128, d_sae=16384, k=32))
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    sae.cfg.metadata.model_name = "random (bench_sae.py)"
    sae.save_model(folder)
    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))
    n = args.wide_tokens // 128
    ids = np.frombuffer(text, np.uint8).astype(np.int64)
    reps = -(-n * 128 // len(ids))
    ids = np.tile(ids, reps)[: n * 128].reshape(n, 128)
    np.save(out / "tokens.npy", ids)
    print(f"16k-feature TopK SAE (random, k=32) at blocks.2.hook_resid_post over {n:,} x 128 = {n * 128:,} tokens "
          f"(the standard library's sources as bytes{', repeated' if reps > 1 else ''})")
    res = {}
    for part in ("floor", "report"):
        cmd = [sys.executable, __file__, "--child", part, "--sae", str(folder), "--tokens", str(out / "tokens.npy")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            sys.exit(r.stderr)
        res[part] = json.loads(r.stdout.strip().splitlines()[-1])
        res[part]["wall"] = wall
    f, rp = res["floor"], res["report"]
    print(f"  floor: {f['seconds']:.1f} s, peak RSS {f['rss'] / 2**30:.2f} GiB")
    print(f"  report data + figures + HTML ({rp['cards']} cards, index of {rp['live']:,} live features, page "
          f"{rp['page'] / 1e6:.1f} MB): {rp['seconds']:.1f} s = {rp['seconds'] / f['seconds']:.2f}x floor, "
          f"peak RSS {rp['rss'] / 2**30:.2f} GiB")


def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if args.child == "floor":
        run = make_floor(args.sae, args.tokens, 0)
        t0 = time.perf_counter()
        run()
        sec = time.perf_counter() - t0
        print(json.dumps({"seconds": sec, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return
    import analyses.sae_features as SF
    from reportgen.data.tokens import load_vocab, mask_tokens
    from reportgen.figures import save
    from reportgen.models.lm import LMSubject, load_model, read_checkpoint, sniff
    from reportgen.probes.lm import probe_lm
    from reportgen.probes.sae import Spliced
    from reportgen.render import environment
    from reportgen.sae import load_sae

    obj = read_checkpoint(CKPT)
    model, causal, rows, _ = load_model(CKPT, obj, sniff(obj), "cpu")
    vocab, src, byte_level = load_vocab(None, CKPT, model.cfg.d_vocab)
    tokens = np.load(args.tokens)
    inputs, scored = mask_tokens(tokens, 0.15, 257, 0, protect=(256,))
    sae, _ = load_sae(Path(args.sae), model, "cpu")
    subject = LMSubject(ref=None, model=model, format="restoration", causal=causal, config_rows=rows, vocab=vocab,
                        vocab_source=src, byte_level=byte_level, mask_id=257, pad_id=256)
    params = SF.Params()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sae-wide-"))
    t0 = time.perf_counter()
    tr = probe_lm(subject, tokens, inputs, scored, SF.needs(params), "cpu", sae=[Spliced(sae, "sae16k")],
                  n_eval=len(tokens), n_act=len(tokens))
    d = SF.compute(tr, params)
    figs = SF.figures(d, params)
    src_map = {}
    for i, f in enumerate(figs):
        f.number, f.stem = i + 1, f"01-sae_features-{i + 1}"
        f.files = {"svg": f"figures/{f.stem}.svg", "png": f"figures/{f.stem}.png"}
        f.width, f.height = int(f.drawing.width), int(f.drawing.height)
        save(f, tmp / f.stem, ("svg", "png"))
        src_map[f.stem] = f.files["svg"]
    html = environment().get_template("partials/sae_features.html").render(
        s={"data": d, "figures": figs}, src=src_map, links=True, script=True)
    (tmp / "section.html").write_text(html, encoding="utf-8")
    json.dumps(d)
    sec = time.perf_counter() - t0
    print(json.dumps({"seconds": sec, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "cards": len(d["features"]), "live": d["saes"][0]["alive"], "page": len(html.encode())}))


if __name__ == "__main__":
    main()
