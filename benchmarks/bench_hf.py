"""Hugging Face folder benchmark: a model shaped like Llama-3.2-1B through the `hf` kind, against the weights' bytes.

The script writes a random model folder with Llama-3.2-1B's shapes (16 layers, hidden 2048, 32 heads with 8
key-value heads, MLP 8192, vocab 128256, tied embeddings, Llama-3 rope scaling) as bf16 safetensors, the way
`save_pretrained` lays it out, beside a byte-level BPE tokenizer trained on the spot, and builds its report in a
child process (`reportgen build --only predictions,token_map`, predictions on 64x128 tokens, a 50x50 token map at
layer 15, HTML and PDF) at `--dtype bfloat16` and `--max-memory 512MiB` (activations beyond the weights; the
default 2GiB adds its 2 GiB to the peak). Printed: the build's wall time split by phase (`--timings`), and
the child's peak RSS as a multiple of the weights' bytes in that dtype (target <= 1.6x).

Then the seed-004 model at its real size (37M parameters, 16 layers, vocab 11812; random weights in the seed's
checkpoint format) through the `lm` kind with the same analyses and tokens, for comparison.

    python benchmarks/bench_hf.py                   # both, 2 threads
    python benchmarks/bench_hf.py --threads 16 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA_32_1B = {  # config.json of meta-llama/Llama-3.2-1B (shapes and rope; the weights here are random)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def sentences(n: int) -> str:
    import random

    rng = random.Random(0)
    subj = ["the model", "a small network", "the optimiser", "every layer", "the tokenizer", "our run", "the loss"]
    verb = ["learns", "predicts", "forgets", "compresses", "attends to", "copies", "repeats"]
    obj = ["the next token", "long contexts", "rare words", "the pattern", "its own output", "numbers like 1024",
           "the café menu", "naïve guesses"]
    return " ".join(f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n))


def write_llama_folder(folder: Path) -> int:
    """config.json, model.safetensors (bf16, random, save_pretrained's names) and tokenizer files; weight bytes."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    raw = dict(LLAMA_32_1B)
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    config.architectures = LLAMA_32_1B["architectures"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied: save_pretrained writes the embedding once
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in shapes.items():
        t = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        sd[k] = t.to(torch.bfloat16)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    n_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sentences(4000)], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)
    return n_bytes


def build_child(cmd: list[str], env: dict) -> tuple[float, int, int, dict]:
    """(wall s, peak RSS bytes, exit status, phases) of one `reportgen build --timings` child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss (KiB) of the child or its largest waited-for descendant
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    phases = {}
    for line in err.splitlines():
        if line.startswith("{"):
            phases = json.loads(line)
    if rc:
        print(err[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, rc, phases


def show(label: str, wall: float, rss: int, rc: int, phases: dict, weight_bytes: int, target: float | None) -> None:
    state = "ok" if rc == 0 else f"FAILED (exit {rc})"
    split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    print(f"{label}: wall {wall:.1f} s {state}")
    print(f"  phases (s): {split}")
    print(f"  peak RSS {rss / 1e9:.2f} GB = {rss / weight_bytes:.2f}x the weights' {weight_bytes / 1e9:.2f} GB"
          + (f" (target <= {target}x)" if target else ""))
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-memory", default="512MiB", help="the builds' --max-memory (activations beyond the weights)")
    ap.add_argument("--keep", metavar="DIR", help="write the model folder and sites here (kept) instead of a temp dir")
    ap.add_argument("--skip-seed", action="store_true", help="only the Llama-3.2-1B-shaped folder")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-hf-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    folder = tmp / "Llama-3.2-1B"
    t0 = time.perf_counter()
    if (folder / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as f:
            bf16_bytes = sum(_numel(f.get_slice(k).get_shape()) * 2 for k in f.keys())
    else:
        bf16_bytes = write_llama_folder(folder)
    n_params = bf16_bytes // 2
    weight_bytes = n_params * {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    print(f"Llama-3.2-1B-shaped folder (random bf16 safetensors, {n_params / 1e9:.3f}B parameters) written in "
          f"{time.perf_counter() - t0:.0f} s; {args.threads} threads, --device {args.device}, --dtype {args.dtype}, "
          f"--max-memory {args.max_memory}")
    notes = tmp / "notes.txt"
    notes.write_text(sentences(6000), encoding="utf-8")
    common = ["--only", "predictions,token_map", "--seq-len", "128", "--max-seqs", "64", "--eval", "64",
              "--max-memory", args.max_memory,
              "--param", "token_map.grid_size=50", "--threads", str(args.threads), "--device", args.device,
              "--force", "-q", "--timings"]
    cmd = [sys.executable, "-m", "reportgen", "build", "--ckpt", str(folder), "--data", str(notes), "--dtype", args.dtype,
           "--param", "token_map.layer=15", "--out", str(tmp / "site-hf"), *common]
    show("hf kind, predictions 64x128 + token map 50x50 at layer 15", *build_child(cmd, env), weight_bytes, 1.6)

    if args.skip_seed:
        return
    import numpy as np
    from bench_lm import SEED_004, write_seed_checkpoint

    ckpt = tmp / "seed004" / "best_model.pt"
    ckpt.parent.mkdir(exist_ok=True)
    n_seed = write_seed_checkpoint(ckpt)
    data = tmp / "tokens_64x128.npy"
    np.save(data, np.random.default_rng(0).integers(5, SEED_004["vocab_size"], (64, 128)).astype(np.int64))
    cmd = [sys.executable, "-m", "reportgen", "build", "--ckpt", str(ckpt), "--data", str(data), "--mask-id", "4",
           "--dtype", args.dtype, "--out", str(tmp / "site-seed004"), *common]
    show(f"seed-004 real size ({n_seed / 1e6:.1f}M parameters) through the lm kind, same analyses and tokens",
         *build_child(cmd, env), n_seed * weight_bytes // n_params, None)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
