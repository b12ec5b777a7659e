"""The adapter protocol: run reportgen's language-model analyses on your own PyTorch model.

An adapter is a function `adapter(checkpoint_path, device) -> Adapted`, in a file (`--adapter FILE.py`, the
function named `adapter`) or a module (`--adapter module:function`). It builds the model, loads the
checkpoint's weights (`load_checkpoint` reads Lightning `.ckpt` files and plain state dicts safely) and says
where the parts of the model are. reportgen wraps it (reportgen/models/adapted.py) in the interface its
probe drives, checks the shapes once on a few tokens, and runs the analyses the declared parts allow;
an analysis that needs a part you did not declare is left out with a note in the report.

This module imports nothing heavy, so an adapter file can `from reportgen.adapter import Adapted`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Adapted:
    """What reportgen needs to know about your model. Module fields are names (as in `model.named_modules()`)
    or the modules themselves."""

    model: object  # the torch.nn.Module, its weights loaded, on `device`
    n_heads: int  # attention heads per layer
    n_ctx: int  # the longest sequence the model takes
    causal: bool = False  # True: next-token prediction; False: a masked (bidirectional) model, needs mask_id
    mask_id: int | None = None  # the mask token's id (a masked model)
    pad_id: int | None = None  # the padding token's id (never masked), if any
    vocab: list | None = None  # token strings by id; or None with `encode` (or --vocab / vocab.json)
    encode: object = None  # callable(text) -> list of token ids, when the vocabulary's characters are not the tokens
    logits: object = None  # callable(tokens [B,T] long) -> [B,T,V]; default: embed → blocks → final_norm → unembed
    embed: object = None  # tokens [B,T] -> residual stream [B,T,D] (with any positional embedding)
    blocks: list = field(default_factory=list)  # per layer: a module [B,T,D] -> [B,T,D] (or a tuple starting with it)
    final_norm: object = None  # [B,T,D] -> [B,T,D] before the unembedding, if the model has one
    unembed: object = None  # [B,T,D] -> [B,T,V]
    attention: object = None  # callable(tokens) -> per-layer list of [B,H,q,k] (or (logits, that list));
    #                           or a list of module names, one per layer, whose forward output is [B,H,q,k]
    #                           (or a tuple whose last element is)
    config: dict = field(default_factory=dict)  # rows for the report's configuration table (e.g. hyper_parameters)
    name: str = ""  # the model's name in the report (default: the model's class name)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict, hyper_parameters) of a checkpoint file, read with torch.load(weights_only=True) (no code
    from the file runs). Understands Lightning `.ckpt` files ({"state_dict", "hyper_parameters", ...}, the
    module's attribute prefix such as `model.` stripped when every key has it), {"model_state_dict", "config"}
    dicts and plain state dicts."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    hp = {}
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            hp = obj.get("hyper_parameters") or obj.get("hparams") or obj.get("config") or {}
            break
    else:
        sd = obj
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: no state dict of tensors in the checkpoint")
    for prefix in ("model.", "net.", "module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, dict(hp) if isinstance(hp, dict) else {}
