"""Building TransformerLens models from state dicts (no hub, no weight processing)."""
from __future__ import annotations

import warnings

BUFFER_SUFFIXES = ("attn.mask", "attn.IGNORE", "attn.rotary_sin", "attn.rotary_cos")


class StateDictMismatch(ValueError):
    pass


def hooked_transformer(cfg, sd: dict, device: str = "cpu"):
    """`HookedTransformer(cfg)` with `sd` loaded as is; raises StateDictMismatch naming the first
    missing / unexpected / mis-shaped tensor. Only TransformerLens' own buffers may be absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3.9 points to TransformerBridge, HF models only
        from transformer_lens import HookedTransformer

        model = HookedTransformer(cfg, move_to_device=False)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(BUFFER_SUFFIXES)]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        what = ([f"missing {', '.join(missing[:3])}"] if missing else []) + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise StateDictMismatch("; ".join(what))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise StateDictMismatch(f"tensor {k} has shape {list(v.shape)} but the config needs {list(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    model.to(device, print_details=False)
    model.eval()
    return model


def config_from_dict(d: dict, device: str = "cpu"):
    """HookedTransformerConfig from a saved `cfg` dict (fields TL 3.9 knows; unknown ones are an error)."""
    import dataclasses

    from transformer_lens import HookedTransformerConfig

    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown HookedTransformerConfig field(s) {', '.join(unknown[:5])}")
    kw = {k: v for k, v in d.items() if k in known and k not in ("device", "n_devices")}
    kw["device"] = device
    return HookedTransformerConfig(**kw)
