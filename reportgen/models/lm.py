"""Language-model checkpoints (seed-004 RestorationModel, TransformerLens) read into a HookedTransformer.

Formats (detected from the file's contents):
- `restoration`: the seed-004 dict `{"model_state_dict", "config", "vocab_size"}` (models/restoration.py);
- `transformer_lens`: `{"cfg": <HookedTransformerConfig fields>, "state_dict": <HookedTransformer keys>}`;
- a whole pickled model (`{"model": HookedTransformer}`, the seed's tl_model.pt): only with
  `trust=True` (`--trust-checkpoint`), because unpickling runs code from the file.
Everything else is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import ReportgenError, first_line

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
    encode: object = None  # callable(text) -> token ids: the model's own tokenizer, when it has one
    dtype: str = "float32"  # the dtype the model runs in
    meta: dict = field(default_factory=dict)  # extra fields of report.json's "model" (the adapter's name and file)
    lacks: dict = field(default_factory=dict)  # probe need key -> why this subject cannot meet it (see supports)

    def supports(self, need: str) -> bool:
        """Can the probe meet this need key (attention, token_map, sae, ...) for this model? An analysis that
        needs one it cannot is left out of the report with a note (all of them, for TransformerLens models)."""
        return need not in self.lacks

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
    from ..checkpoints import strip_prefixes

    return strip_prefixes(sd, STRIP_PREFIXES)


def load_model(path: Path, obj, fmt: str, device: str):
    """(HookedTransformer, causal, config rows, config-declared ids) for a sniffed checkpoint."""
    import torch

    from ..checkpoints import check_finite
    from .tl import StateDictMismatch, config_from_dict, hooked_transformer

    if fmt == "restoration":
        from .restoration import RestorationConfig, expected_shapes, to_hooked

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
