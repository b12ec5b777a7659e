"""Reader for the upstream puzzle dataset layout (shared/specs/trm.md §4).

    <dir>/identifiers.json
    <dir>/<split>/dataset.json                 {"seq_len", "vocab_size", "sets": ["all"], ...}
    <dir>/<split>/<set>__inputs.npy            [N, 81] uint8 or int64, token = digit + 1, blank = 1
    <dir>/<split>/<set>__labels.npy            [N, 81]
    <dir>/<split>/<set>__puzzle_identifiers.npy [N] int32
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ReportgenError, first_line

FIELDS = ("inputs", "labels", "puzzle_identifiers")


@dataclass
class PuzzleSplit:
    root: Path  # the dataset directory
    split: str  # "test" or "train"
    meta: dict  # dataset.json
    inputs: np.ndarray  # [N, S] int64 token ids
    labels: np.ndarray  # [N, S] int64 token ids
    puzzle_identifiers: np.ndarray  # [N] int64
    set_sizes: tuple = ()  # puzzles per set of meta["sets"], in order (the arrays are their concatenation)

    def __len__(self) -> int:
        return len(self.inputs)


def read_meta(root: Path, split: str) -> dict:
    path = root / split / "dataset.json"
    if not path.is_file():
        raise ReportgenError(f"{path}: missing (not a dataset folder in the upstream layout, or no {split!r} split)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportgenError(f"{path}: not valid JSON ({e})") from None
    for key in ("seq_len", "vocab_size", "sets"):
        if key not in meta:
            raise ReportgenError(f"{path}: has no {key!r} field")
    return meta


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ReportgenError(f"{path}: missing from the dataset folder")
    try:  # memory-mapped first: a header that claims more data than the file holds fails here, not in malloc
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:
        raise ReportgenError(f"{path}: empty file, not a .npy array") from None
    except (OSError, ValueError) as e:
        raise ReportgenError(f"{path}: not a readable .npy array ({first_line(e)})") from None
    if not isinstance(arr, np.ndarray):
        raise ReportgenError(f"{path}: not a .npy array (an .npz archive?)")
    if arr.dtype.kind not in "iu":
        raise ReportgenError(f"{path}: has dtype {arr.dtype}; the upstream layout stores integer token ids")
    return arr


def read_split(root: str | Path, split: str) -> PuzzleSplit:
    root = Path(root)
    if not root.is_dir():
        raise ReportgenError(f"{root}: dataset folder not found")
    meta = read_meta(root, split)
    parts: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    for set_name in meta["sets"]:
        for f in FIELDS:
            parts[f].append(_load_npy(root / split / f"{set_name}__{f}.npy"))
    arrays = {f: np.concatenate(v).astype(np.int64) for f, v in parts.items()}
    S = int(meta["seq_len"])
    for f in ("inputs", "labels"):
        a = arrays[f]
        if a.ndim != 2 or a.shape[1] != S:
            raise ReportgenError(f"{root / split}: {f} has shape {list(a.shape)}, dataset.json says seq_len {S}")
    n = len(arrays["inputs"])
    if len(arrays["labels"]) != n or len(arrays["puzzle_identifiers"]) != n:
        raise ReportgenError(
            f"{root / split}: inputs, labels and puzzle_identifiers have different lengths "
            f"({n}, {len(arrays['labels'])}, {len(arrays['puzzle_identifiers'])})"
        )
    if n == 0:
        raise ReportgenError(f"{root / split}: the split is empty")
    return PuzzleSplit(root=root, split=split, meta=meta, **arrays, set_sizes=tuple(len(a) for a in parts["inputs"]))


def check_ids(split: PuzzleSplit, vocab_size: int, n_puzzle_ids: int | None) -> None:
    """Every token id below the model's vocab_size and every puzzle id below its number of puzzle
    embeddings (None: the model has none, so the ids are not read)."""
    for f, hi in (("inputs", vocab_size), ("labels", vocab_size), ("puzzle_identifiers", n_puzzle_ids)):
        a = getattr(split, f)
        bad = np.flatnonzero((a < 0) | (a >= hi)) if hi is not None else []
        if len(bad):
            i = int(bad[0])
            row = i // a.shape[1] if a.ndim == 2 else i
            ends = np.cumsum(split.set_sizes)
            k = int(np.searchsorted(ends, row, side="right"))  # the set (file) that row comes from
            name, row = split.meta["sets"][k], row - (int(ends[k - 1]) if k else 0)
            what = "puzzle id" if f == "puzzle_identifiers" else "token id"
            raise ReportgenError(f"{split.root / split.split / f'{name}__{f}.npy'}: {what} {int(a.flat[i])} in row {row} "
                                 f"is outside the checkpoint's 0..{hi - 1} ({len(bad):,} value(s) out of range: a "
                                 f"dataset of another model?)")


def select(n_total: int, n: int, how: str, seed: int, where: str) -> np.ndarray:
    """Row indices of the puzzles to report on: the first n, or n at random (sorted) with a seed."""
    if n < 1:
        raise ReportgenError(f"--samples must be at least 1, not {n}")
    if n > n_total:
        raise ReportgenError(f"{where}: --samples {n} is larger than the split ({n_total} puzzles)")
    if how == "first":
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False))
