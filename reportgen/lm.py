"""Language-model subjects: checkpoint formats, vocabulary and evaluation tokens.

Formats (detected from the file's contents):
- `restoration`: the seed-004 dict `{"model_state_dict", "config", "vocab_size"}` (models/restoration.py);
- `transformer_lens`: `{"cfg": <HookedTransformerConfig fields>, "state_dict": <HookedTransformer keys>}`;
- a whole pickled model (`{"model": HookedTransformer}`, the seed's tl_model.pt): only with
  `trust=True` (`--trust-checkpoint`), because unpickling runs code from the file.
Everything else is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ReportgenError, first_line
from .text import show_token, symbol_key  # noqa: F401  (token display lives in text.py; imported from here by analyses)

MASK_NAMES = ("[MASK]", "<mask>", "<MASK>", "[mask]")
PAD_NAMES = ("[PAD]", "<pad>", "<PAD>")
STRIP_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class LMSubject:
    ref: object  # CheckpointRef
    model: object  # HookedTransformer, eval mode, on the probe device
    format: str  # restoration | transformer_lens | pickled HookedTransformer
    causal: bool
    config_rows: list  # (field, value, source)
    vocab: list  # token strings, at least d_vocab long
    vocab_source: str
    byte_level: bool
    mask_id: int | None
    pad_id: int | None
    notes: list = field(default_factory=list)

    @property
    def cfg(self):
        return self.model.cfg


def _numpy_safe_globals():
    """numpy scalars and dtypes: plain data that TransformerLens configs hold (attn_scale is np.float64)."""
    import numpy

    out = [numpy.dtype]
    core = getattr(numpy, "_core", None) or numpy.core
    out.append(core.multiarray.scalar)
    out += [type(numpy.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def read_checkpoint(path: Path, trust: bool = False):
    """The checkpoint's top-level object. weights_only=True unless `trust` (then with a warning)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ReportgenError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
        if not trust:
            why = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), "")
            why = why.split("WeightsUnpickler error: ")[-1].split(" was not an allowed")[0]
            raise ReportgenError(
                f"{path}: holds pickled Python objects ({why[:100]}); loading it would run code from the file. "
                f"If you trust it (e.g. a whole pickled HookedTransformer you saved), pass --trust-checkpoint") from None
    except Exception as e:  # noqa: BLE001 - unreadable untrusted input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReportgenError(f"{path}: not a readable PyTorch checkpoint ({first[:120]})") from None
    print(f"reportgen: warning: {path}: unpickling with --trust-checkpoint (this runs code from the file)",
          file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ReportgenError(f"{path}: could not be unpickled ({first_line(e)})") from None


def sniff(obj) -> str | None:
    """The LM format of a loaded checkpoint object, or None."""
    if isinstance(obj, dict):
        if isinstance(obj.get("model_state_dict"), dict) and isinstance(obj.get("config"), dict):
            return "restoration"
        if isinstance(obj.get("cfg"), dict) and isinstance(obj.get("state_dict"), dict):
            return "transformer_lens"
        if type(obj.get("model")).__name__ in ("HookedTransformer", "HookedSAETransformer"):
            return "pickled"
    if type(obj).__name__ in ("HookedTransformer", "HookedSAETransformer"):
        return "pickled"
    return None


def _strip(sd: dict) -> dict:
    from .checkpoints import strip_prefixes

    return strip_prefixes(sd, STRIP_PREFIXES)


def load_model(path: Path, obj, fmt: str, device: str):
    """(HookedTransformer, causal, config rows, config-declared ids) for a sniffed checkpoint."""
    import torch

    from .checkpoints import check_finite
    from .models.tl import StateDictMismatch, config_from_dict, hooked_transformer

    if fmt == "restoration":
        from .models.restoration import RestorationConfig, expected_shapes, to_hooked

        try:
            cfg = RestorationConfig.from_dict(obj["config"])
        except (TypeError, ValueError) as e:
            raise ReportgenError(f"{path}: invalid config ({e})") from None
        sd = _strip(obj["model_state_dict"])
        if not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ReportgenError(f"{path}: model_state_dict holds something other than tensors")
        check_finite(path, sd)
        want = expected_shapes(cfg)
        missing = [k for k in want if k not in sd]
        extra = [k for k in sd if k not in want]
        if missing or extra:
            what = ([f"missing {', '.join(missing[:3])}"] if missing else []) + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
            raise ReportgenError(f"{path}: config does not match the weights ({'; '.join(what)})")
        for k, shape in want.items():
            if tuple(sd[k].shape) != shape:
                raise ReportgenError(f"{path}: config does not match the weights: {k} has shape {list(sd[k].shape)}, "
                                     f"the config (d_model={cfg.d_model}, d_ff={cfg.d_ff}, vocab_size={cfg.vocab_size}) "
                                     f"needs {list(shape)}")
        if obj.get("vocab_size") not in (None, cfg.vocab_size):
            raise ReportgenError(f"{path}: vocab_size {obj['vocab_size']} does not match config vocab_size {cfg.vocab_size}")
        rows = [(k, v, "config" if k in obj["config"] else "default") for k, v in cfg.to_dict().items()]
        return to_hooked(sd, cfg, device), cfg.causal, rows, {"mask": cfg.mask_token_id, "pad": cfg.pad_token_id}
    if fmt == "transformer_lens":
        try:
            cfg = config_from_dict(dict(obj["cfg"]), device)
        except (TypeError, ValueError, AssertionError) as e:
            raise ReportgenError(f"{path}: invalid TransformerLens cfg ({e})") from None
        check_finite(path, obj["state_dict"], allow_inf=("attn.IGNORE",))  # TransformerLens' -inf mask value
        try:
            model = hooked_transformer(cfg, _strip(obj["state_dict"]), device)
        except StateDictMismatch as e:
            raise ReportgenError(f"{path}: cfg does not match the state_dict ({e})") from None
    else:
        model = obj if sniff(obj) == "pickled" and not isinstance(obj, dict) else obj["model"]
        model = model.to(device, print_details=False).eval()
        check_finite(path, dict(model.named_parameters()))
    c = model.cfg
    fields = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type",
              "positional_embedding_type", "rotary_base", "rotary_adjacent_pairs", "attention_dir")
    rows = [(k, getattr(c, k), "cfg") for k in fields if hasattr(c, k)]
    return model, c.attention_dir == "causal", rows, {"mask": None, "pad": None}


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


def load_tokens(path: Path, vocab: list[str], byte_level: bool, d_vocab: int, seq_len: int, max_seqs: int) -> np.ndarray:
    """[n_seq, seq_len] int64 evaluation tokens from a text file, a .npy/.pt array or a datasets folder."""
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
        rows = _text_rows(path, vocab, byte_level, seq_len, max_seqs)
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


def _text_rows(path: Path, vocab: list[str], byte_level: bool, seq_len: int, max_seqs: int) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportgenError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if byte_level:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    else:
        lookup = {t: i for i, t in enumerate(vocab) if len(t) == 1}
        if not lookup:
            raise ReportgenError(f"{path}: text data needs a byte- or character-level vocabulary (--vocab bytes or vocab.json)")
        unk = next((i for i, t in enumerate(vocab) if t in ("[UNK]", "<unk>", "<UNK>")), None)
        ids = []
        for ch in text[: seq_len * max_seqs]:
            i = lookup.get(ch, unk)
            if i is None:
                raise ReportgenError(f"{path}: character {ch!r} is not in the vocabulary and it has no [UNK] token")
            ids.append(i)
        ids = np.asarray(ids, dtype=np.int64)
    n = min(len(ids) // seq_len, max_seqs)
    return list(ids[: n * seq_len].reshape(n, seq_len))


def mask_tokens(tokens: np.ndarray, rate: float, mask_id: int, seed: int, protect: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """(masked input, bool positions) with `rate` of the positions replaced by `mask_id`; seeded."""
    rng = np.random.default_rng(seed)
    pos = rng.random(tokens.shape) < rate
    for t in protect:
        pos &= tokens != t
    return np.where(pos, mask_id, tokens), pos
