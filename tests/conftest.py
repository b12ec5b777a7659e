"""Fixtures: tiny real TRMs saved the way upstream pretrain.py saves them, and datasets in the upstream layout."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reportgen.models.trm import TRM, TRMConfig

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"  # the steering repo's shared/, beside the checkout
UPSTREAM = SHARED / "fixtures" / "trm-upstream"
needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"upstream TRM fixtures not found at {UPSTREAM}")

TINY_ARCH = dict(hidden_size=32, num_heads=2, expansion=4, H_cycles=2, L_cycles=2, L_layers=1, halt_max_steps=3,
                 puzzle_emb_ndim=32, puzzle_emb_len=4, pos_encodings="rope", forward_dtype="float32", mlp_t=False)


def solved_grid(rng: np.random.Generator) -> np.ndarray:
    """A valid 9x9 Sudoku solution: the canonical pattern with shuffled digits, rows and columns."""
    base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 for c in range(9)] for r in range(9)])
    digits = rng.permutation(9) + 1
    rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    return digits[base[rows][:, cols]]


def write_dataset(root: Path, n_test: int = 12, n_train: int = 8, seed: int = 0, test_dtype=np.uint8) -> Path:
    """A dataset folder in the upstream layout (spec §4) with token ids: blank = 1, digit d = d + 1."""
    rng = np.random.default_rng(seed)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "identifiers.json").write_text(json.dumps(["<blank>"]))
    for split, n, dt in (("train", n_train, np.int64), ("test", n_test, test_dtype)):
        d = root / split
        d.mkdir(exist_ok=True)
        sol = np.stack([solved_grid(rng).reshape(-1) for _ in range(n)])
        inp = sol.copy()
        for row in inp:
            row[rng.choice(81, size=40, replace=False)] = 0
        np.save(d / "all__inputs.npy", (inp + 1).astype(dt))
        np.save(d / "all__labels.npy", (sol + 1).astype(dt))
        np.save(d / "all__puzzle_identifiers.npy", np.zeros(n, np.int32))
        np.save(d / "all__puzzle_indices.npy", np.arange(n + 1, dtype=np.int32))
        np.save(d / "all__group_indices.npy", np.arange(n + 1, dtype=np.int32))
        meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 11, "seq_len": 81,
                "num_puzzle_identifiers": 1, "total_groups": n, "mean_puzzle_examples": 1.0, "total_puzzles": n,
                "sets": ["all"]}
        (d / "dataset.json").write_text(json.dumps(meta))
    return root


def make_model(seed: int = 0, **arch) -> TRM:
    torch.manual_seed(seed)
    cfg = TRMConfig(**{**TINY_ARCH, **arch})
    m = TRM(cfg)
    with torch.no_grad():  # give every tensor non-trivial values (upstream zero-inits q_head and puzzle_emb)
        for p in m.parameters():
            p.normal_(0, 0.3)
        if cfg.puzzle_emb_ndim:
            m.puzzle_emb.weights.normal_(0, 0.3)
    return m.eval()


def save_upstream(model: TRM, run_dir: Path, step: int, data_path: str, prefix: str = "_orig_mod.model.inner.",
                  write_config: bool = True, init_dtype=None) -> Path:
    """Save as upstream pretrain.py does: a raw prefixed state dict `step_N` and all_config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if init_dtype is not None:
        for k in ("H_init", "L_init"):
            sd[prefix + k] = sd[prefix + k].to(init_dtype)
    path = run_dir / f"step_{step}"
    torch.save(sd, path)
    if write_config:
        cfg = model.cfg
        arch = {k: getattr(cfg, k) for k in TINY_ARCH}
        arch.update(name="recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", H_layers=0,
                    halt_exploration_prob=0.1, no_ACT_continue=True,
                    loss={"loss_type": "stablemax_cross_entropy", "name": "losses@ACTLossHead"})
        conf = {"arch": arch, "data_paths": [data_path], "data_paths_test": [], "ema": True, "ema_rate": 0.999,
                "global_batch_size": 8, "lr": 1e-3, "run_name": run_dir.name, "project_name": "Tiny-ACT-torch",
                "seed": 0, "checkpoint_path": str(run_dir)}
        (run_dir / "all_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=True))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with two checkpoints of a tiny TRM and its dataset, in a project-like layout."""
    root = tmp_path_factory.mktemp("proj")
    write_dataset(root / "data" / "tiny-sudoku")
    run = root / "checkpoints" / "Tiny-ACT-torch" / "tiny run"  # upstream run names may contain spaces
    models = {}
    for step, seed in ((100, 1), (200, 2)):
        models[step] = make_model(seed)
        save_upstream(models[step], run, step, "data/tiny-sudoku")
    return {"root": root, "run": run, "data": root / "data" / "tiny-sudoku", "models": models}


def run_act(model: TRM, inputs: np.ndarray, pids: np.ndarray):
    """Reference eval loop: fresh carry, halt_max_steps ACT steps; per-step logits and q_halt."""
    out = []
    with torch.inference_mode():
        x = model.input_embeddings(torch.as_tensor(inputs), torch.as_tensor(pids))
        z_H, z_L = model.initial_carry(len(inputs), "cpu")
        for _ in range(model.cfg.halt_max_steps):
            z_H, z_L, logits, qh, qc = model.act_step(z_H, z_L, x)
            out.append((logits.clone(), qh.clone(), qc.clone()))
    return out, z_H, z_L


# ---------------------------------------------------------------- language models (seed 004 format)

from reportgen.models.restoration import RestorationConfig, RestorationModel  # noqa: E402

TINY_LM = dict(vocab_size=258, max_position=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0, rotary_base=10000)
EVAL_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
             "        self.y = y\n\n# the quick brown fox jumps over the lazy dog\n") * 12


def make_lm(seed: int = 0, **cfg) -> RestorationModel:
    torch.manual_seed(seed)
    m = RestorationModel(RestorationConfig.from_dict({**TINY_LM, **cfg}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def save_restoration(model: RestorationModel, path: Path, vocab: bool = True, config: dict | None = None) -> Path:
    """Save as the seed's training code does: {"model_state_dict", "config", "vocab_size"} (+ vocab.json beside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else {k: v for k, v in model.cfg.to_dict().items() if k in TINY_LM or k == "causal" and v}
    torch.save({"model_state_dict": model.state_dict(), "config": cfg, "vocab_size": model.cfg.vocab_size}, path)
    if vocab:
        voc = {str(i): chr(i) for i in range(256)} | {"256": "[PAD]", "257": "[MASK]"}
        (path.parent / "vocab.json").write_text(json.dumps(voc))
    return path


@pytest.fixture
def lm_run(tmp_path) -> tuple[Path, Path]:
    """(run folder with two tiny restoration checkpoints step_10.pt, step_20.pt, evaluation text file)."""
    run = tmp_path / "lm run"
    save_restoration(make_lm(0), run / "step_10.pt")
    save_restoration(make_lm(1), run / "step_20.pt")
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    return run, text


HIERARCHICAL = Path(__file__).resolve().parents[1] / "examples" / "hierarchical"


@contextlib.contextmanager
def hierarchical_copy(dst: Path, text: str):
    """The hierarchical example's model.py and adapter.py copied into dst with a vocabulary of text's characters
    (vocab.json) and eval.txt; dst is on sys.path meanwhile (so `from model import HierarchicalMLM` works).
    Yields the vocabulary."""
    for f in ("model.py", "adapter.py"):
        shutil.copy(HIERARCHICAL / f, dst / f)
    vocab = ["[PAD]", "[MASK]"] + sorted(set(text))
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "eval.txt").write_text(text)
    sys.path.insert(0, str(dst))
    try:
        yield vocab
    finally:
        sys.path.remove(str(dst))
        sys.modules.pop("model", None)
