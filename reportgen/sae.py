"""Sparse autoencoders through SAELens: load one from its on-disk layout, or train one offline.

SAELens is imported only here (it takes seconds to import). The hook point comes from the SAE's
own config (`metadata.hook_name`); its d_in must match that hook's activations in the model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import ReportgenError, first_line

SAE_FILES = ("cfg.json", "sae_weights.safetensors")


def _quiet():
    import logging

    warnings.filterwarnings("ignore", module="sae_lens")
    logging.getLogger("sae_lens").setLevel(logging.ERROR)


def hook_width(model, hook: str, head=None) -> int:
    """Last dimension of the activation at `hook` (from a two-token forward): heads × d_head for a hook_z, or
    d_head when the SAE reads one head (`head`)."""
    import torch

    seen = {}

    def grab(x, hook):
        seen["shape"] = tuple(x.shape)

    with torch.inference_mode():
        model.run_with_hooks(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device), fwd_hooks=[(hook, grab)],
                             return_type=None)
    shape = seen["shape"]
    if len(shape) == 3:
        return shape[-1]
    return shape[-1] if head is not None else shape[-2] * shape[-1]


def describe(sae, folder: str, how: str) -> dict:
    c = sae.cfg
    meta = c.metadata
    out_hook = getattr(meta, "hook_name_out", None)
    return {"folder": folder, "how": how, "architecture": c.architecture(), "hook": meta.hook_name, "d_in": int(c.d_in),
            "d_sae": int(c.d_sae), "k": getattr(c, "k", None), "trained_on": getattr(meta, "model_name", None),
            "context_size": getattr(meta, "context_size", None),
            **({"hook_out": out_hook or meta.hook_name, "d_out": int(c.d_out)} if hasattr(c, "d_out") else {})}


def load_sae(folder: Path, model, device: str):
    """(SAE, description) from SAELens' layout; one clear error for a missing or mismatched SAE."""
    if not folder.is_dir():
        raise ReportgenError(f"{folder}: SAE folder not found (--sae)")
    missing = [f for f in SAE_FILES if not (folder / f).is_file()]
    if missing:
        raise ReportgenError(f"{folder}: not an SAELens SAE folder (missing {', '.join(missing)})")
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except ValueError as e:
        raise ReportgenError(f"{folder / 'cfg.json'}: not valid JSON ({e})") from None
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")  # pre-6.0 key
    if not hook:
        raise ReportgenError(f"{folder / 'cfg.json'}: no metadata.hook_name: the SAE does not say where it reads the model")
    arch = cfg.get("architecture", "standard")
    _check_hook(model, folder, hook, cfg.get("d_in"), meta.get("hook_head_index"), "reads", "d_in")
    _quiet()
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if arch not in SAE_CLASS_REGISTRY:
        raise ReportgenError(f"{folder / 'cfg.json'}: architecture {arch!r} is not one SAELens {_saelens_version()} "
                             f"knows (it knows {', '.join(sorted(SAE_CLASS_REGISTRY))})")
    if "d_out" in cfg or "transcoder" in arch:
        out = meta.get("hook_name_out") or cfg.get("hook_name_out") or hook
        _check_hook(model, folder, out, cfg.get("d_out"), meta.get("hook_head_index_out"), "writes (its output hook)",
                    "d_out")
    try:
        sae = SAE.load_from_disk(str(folder), device=device)
    except Exception as e:  # noqa: BLE001 - a corrupt SAE is the user's input
        raise ReportgenError(f"{folder}: SAELens could not load the SAE ({first_line(e, 140)})") from None
    if ("d_out" in cfg or "transcoder" in arch) and not getattr(sae.cfg.metadata, "hook_name_out", None):
        sae.cfg.metadata.hook_name_out = meta.get("hook_name_out") or cfg.get("hook_name_out") or hook
    sae.eval()
    return sae, describe(sae, str(folder), "--sae")


def _check_hook(model, folder: Path, hook: str, width, head, verb: str, key: str) -> None:
    if hook not in model.hook_dict:
        raise ReportgenError(f"{folder / 'cfg.json'}: the SAE {verb} {hook}, a hook point this model does not have "
                             f"({model.cfg.n_layers} layers)")
    have = hook_width(model, hook, head)
    if width is None or int(width) != have:
        raise ReportgenError(f"{folder / 'cfg.json'}: SAE {key} {width} does not match {hook}, whose activations have "
                             f"{have} dimensions")


def _saelens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


def temp_folder() -> Path:
    """A folder for an SAE trained for one report until the report takes it in. Removed at exit if a failure
    after the training left it there (a failed training removes it at once, see `train_sae`)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="reportgen-sae-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def train_sae(model, tokens, layer: int, out: Path, device: str, arch: str = "topk", training_tokens: int = 200_000,
              expansion: int = 4, k: int = 16, l1: float = 5.0, seed: int = 0, label: str = "reportgen"):
    """Train an SAE on `blocks.{layer}.hook_resid_post` with SAELens' own runner, offline, on `tokens`
    [n_seq, ctx]; saved in SAELens' layout in `out`, whose files get the site's modes. Returns (SAE,
    description). On any failure `out` is removed: no half-trained SAE is left behind."""
    import shutil

    from .site import public_mode

    try:
        sae, info = _train(model, tokens, layer, out, device, arch, training_tokens, expansion, k, l1, seed, label)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    for p in (out, *out.rglob("*")):  # SAELens writes the safetensors files private (0600)
        public_mode(p)
    return sae, info


def _train(model, tokens, layer, out, device, arch, training_tokens, expansion, k, l1, seed, label):
    import torch

    if not 0 <= layer < model.cfg.n_layers:
        raise ReportgenError(f"--train-sae {layer}: layer out of range (the model has layers 0..{model.cfg.n_layers - 1})")
    _quiet()
    import datasets
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, SAE,
                          StandardTrainingSAEConfig, TopKTrainingSAEConfig)

    d_in, ctx = model.cfg.d_model, int(tokens.shape[1])
    if arch == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=expansion * d_in, k=k)
    elif arch == "standard":
        sae_cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=expansion * d_in, l1_coefficient=l1, l1_warm_up_steps=20)
    else:
        raise ReportgenError(f"--sae-arch must be topk or standard, not {arch!r}")
    batch_tokens = min(4096, int(tokens.size))
    store = max(1, min(32, len(tokens)))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=label, hook_name=f"blocks.{layer}.hook_resid_post", dataset_path="",
        is_dataset_tokenized=True, streaming=False, context_size=ctx, prepend_bos=False,
        training_tokens=training_tokens, train_batch_size_tokens=batch_tokens, store_batch_size_prompts=store,
        n_batches_in_buffer=max(2, -(-2 * batch_tokens // ctx)), device=device, seed=seed,  # buffer >= batch
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=str(out), verbose=False,
    )
    ds = datasets.Dataset.from_dict({"tokens": [list(map(int, r)) for r in tokens]})
    torch.manual_seed(seed)
    try:
        LanguageModelSAETrainingRunner(cfg, override_dataset=ds, override_model=model).run()
    except Exception as e:  # noqa: BLE001
        raise ReportgenError(f"--train-sae {layer}: SAELens training failed ({first_line(e, 160)})") from None
    sae = SAE.load_from_disk(str(out), device=device)
    sae.eval()
    return sae, describe(sae, str(out), f"trained by reportgen with SAELens ({arch}, {training_tokens:,} tokens)")
