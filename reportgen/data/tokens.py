"""Language-model evaluation data: vocabularies, token arrays from text / .npy / .pt / datasets folders, masking."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ReportgenError, first_line

MASK_NAMES = ("[MASK]", "<mask>", "<MASK>", "[mask]")
PAD_NAMES = ("[PAD]", "<pad>", "<PAD>")


def load_vocab(spec: str | None, ckpt: Path, d_vocab: int) -> tuple[list[str], str, bool]:
    """(token strings, where they came from, byte-level?). spec: a file, 'bytes', or None (vocab.json beside)."""
    if spec == "bytes":
        if d_vocab < 256:
            raise ReportgenError(f"--vocab bytes: the model has only {d_vocab} token ids, fewer than 256 bytes")
        return [chr(i) for i in range(256)] + [f"#{i}" for i in range(256, d_vocab)], "--vocab bytes", True
    path = Path(spec) if spec else ckpt.parent / "vocab.json"
    if not path.is_file():
        if spec:
            raise ReportgenError(f"{path}: vocabulary file not found (--vocab)")
        return [f"#{i}" for i in range(d_vocab)], "none (ids shown as #id)", False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportgenError(f"{path}: not a JSON vocabulary ({e})") from None
    if isinstance(raw, dict):
        try:
            items = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            # the {token: id} direction (tokenizer vocab files)
            try:
                items = {int(v): str(k) for k, v in raw.items()}
            except (TypeError, ValueError):
                raise ReportgenError(f"{path}: vocabulary must map id -> string (or string -> id)") from None
        n = max(items, default=-1) + 1
        vocab = [items.get(i, f"#{i}") for i in range(n)]
    elif isinstance(raw, list):
        vocab = [str(v) for v in raw]
    else:
        raise ReportgenError(f"{path}: vocabulary must be a JSON object (id -> string) or a list")
    if len(vocab) < d_vocab:
        raise ReportgenError(f"{path}: vocabulary has {len(vocab)} entries but the model has {d_vocab} token ids")
    byte_level = len(vocab) >= 256 and all(vocab[i] == chr(i) for i in range(256))
    return vocab, str(path), byte_level


def special_id(vocab: list[str], names, declared: int | None, d_vocab: int) -> int | None:
    if declared is not None:
        return int(declared) if 0 <= int(declared) < d_vocab else None
    return next((i for i, t in enumerate(vocab[:d_vocab]) if t in names), None)


# ---------------------------------------------------------------- evaluation tokens


def load_tokens(path: Path, vocab: list[str], byte_level: bool, d_vocab: int, seq_len: int, max_seqs: int,
                encode=None) -> np.ndarray:
    """[n_seq, seq_len] int64 evaluation tokens from a text file, a .npy/.pt array or a datasets folder.
    `encode(text) -> ids`: the model's own tokenizer for text (a Hugging Face folder's); else bytes or the vocabulary's characters."""
    if not path.exists():
        raise ReportgenError(f"{path}: evaluation data not found (--data)")
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise ReportgenError(f"{path}: not a readable .npy token array ({e})") from None
        rows = _array_rows(path, arr, seq_len)
    elif path.suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ReportgenError(f"{path}: not a readable token tensor ({first_line(e, 100)})") from None
        if isinstance(obj, dict):
            obj = obj.get("tokens", obj.get("input_ids"))
        if not isinstance(obj, torch.Tensor):
            raise ReportgenError(f"{path}: expected a token tensor [n_seq, ctx] (or a dict with 'tokens'/'input_ids')")
        rows = _array_rows(path, obj.numpy(), seq_len)
    else:
        rows = _text_rows(path, vocab, byte_level, seq_len, max_seqs, encode)
    rows = [r[:seq_len] for r in rows if len(r) >= seq_len][:max_seqs]
    if not rows:
        raise ReportgenError(f"{path}: no evaluation sequence of at least {seq_len} tokens (empty data? lower --seq-len)")
    toks = np.asarray(rows, dtype=np.int64)
    bad = (toks < 0) | (toks >= d_vocab)
    if bad.any():
        raise ReportgenError(f"{path}: token id {int(toks[bad][0])} is outside the model's vocabulary (0..{d_vocab - 1})")
    return toks


def _array_rows(path: Path, arr: np.ndarray, seq_len: int) -> list:
    if arr.dtype.kind not in "iu":
        raise ReportgenError(f"{path}: token array has dtype {arr.dtype}, not integers")
    if arr.ndim == 1:
        n = len(arr) // seq_len
        return list(arr[: n * seq_len].reshape(n, seq_len))
    if arr.ndim != 2:
        raise ReportgenError(f"{path}: token array has shape {list(arr.shape)}; expected [n_seq, ctx]")
    return list(arr)


def _dataset_rows(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise ReportgenError(f"{path}: reading a datasets folder needs the 'datasets' package: pip install 'reportgen[lm]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise ReportgenError(f"{path}: not a datasets folder saved with save_to_disk ({first_line(e, 100)})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in ("validation", "test") if s in ds), None)
        if split is None:
            raise ReportgenError(f"{path}: no 'validation' or 'test' split (splits: {', '.join(ds)})")
        ds = ds[split]
    col = next((c for c in ("input_ids", "tokens") if c in ds.column_names), None)
    if col is None:
        raise ReportgenError(f"{path}: no 'input_ids' or 'tokens' column (columns: {', '.join(ds.column_names)})")
    return [np.asarray(r, dtype=np.int64) for r in ds[col]]


def _text_rows(path: Path, vocab: list[str], byte_level: bool, seq_len: int, max_seqs: int, encode=None) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportgenError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = encode_text(text[: seq_len * max_seqs] if encode is None and not byte_level else text, vocab, byte_level,
                      encode, str(path))
    n = min(len(ids) // seq_len, max_seqs)
    return list(ids[: n * seq_len].reshape(n, seq_len))


def encode_text(text: str, vocab: list[str], byte_level: bool, encode=None, where: str = "text") -> np.ndarray:
    """Token ids of a text: the model's own tokenizer when it has one, else its bytes or the vocabulary's characters."""
    if encode is not None:
        return np.asarray(encode(text), dtype=np.int64)
    if byte_level:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    lookup = {t: i for i, t in enumerate(vocab) if len(t) == 1}
    if not lookup:
        raise ReportgenError(f"{where}: text data needs a byte- or character-level vocabulary (--vocab bytes or vocab.json)")
    unk = next((i for i, t in enumerate(vocab) if t in ("[UNK]", "<unk>", "<UNK>")), None)
    ids = []
    for ch in text:
        i = lookup.get(ch, unk)
        if i is None:
            raise ReportgenError(f"{where}: character {ch!r} is not in the vocabulary and it has no [UNK] token")
        ids.append(i)
    return np.asarray(ids, dtype=np.int64)


def mask_tokens(tokens: np.ndarray, rate: float, mask_id: int, seed: int, protect: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """(masked input, bool positions) with `rate` of the positions replaced by `mask_id`; seeded."""
    rng = np.random.default_rng(seed)
    pos = rng.random(tokens.shape) < rate
    for t in protect:
        pos &= tokens != t
    return np.where(pos, mask_id, tokens), pos
