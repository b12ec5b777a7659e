"""The `adapter` kind: your own PyTorch model, described by an adapter (reportgen/adapter.py) and run by
the language-model probe through a HookedTransformer-like facade (reportgen/models/adapted.py). Never
sniffed: it runs user code, so only `--adapter FILE.py|module:function` or `[model] adapter` selects it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReportgenError
from . import lm

NAME = "adapter"
DESCRIPTION = "your own PyTorch model through --adapter"
SUBJECT = "lm"
SNIFFED = False


@dataclass
class Options(lm.Options):
    adapter: str | None = None


def sniff(path: Path) -> bool:
    return False


def check(ref, opts) -> None:
    from ..models.adapted import adapter_file

    f = adapter_file(opts.adapter)
    if opts.adapter.endswith(".py") and (f is None or not f.is_file()):
        raise ReportgenError(f"{opts.adapter}: adapter file not found (--adapter)")
    if not ref.path.exists():
        raise ReportgenError(f"{ref.path}: checkpoint not found")
    if not opts.data:
        raise ReportgenError(f"{ref.path}: an adapted model needs --data (a UTF-8 text file, a .npy/.pt token array "
                             f"or a datasets folder)")
    if not Path(opts.data).exists():
        raise ReportgenError(f"{opts.data}: evaluation data not found (--data)")
    if opts.dtype == "config":
        raise ReportgenError("--dtype config is for TRM checkpoints; a language model runs in float32, bfloat16 or float16")


SIBLINGS = ("*.py", "*.json")  # beside an adapter FILE.py: the model code it imports, the vocabulary it reads
MAX_SIBLINGS = 200


def inputs(ref, opts) -> list[Path]:
    """The evaluation data, the SAE, the adapter's source (its bytes) and a --vocab file; for an adapter FILE.py
    also the .py and .json files beside it (its folder is on sys.path while it runs, so its model.py and
    vocab.json are part of what the report shows: editing one rebuilds)."""
    from ..models.adapted import adapter_file

    files = lm.data_files(opts)
    f = adapter_file(opts.adapter)
    if f is not None and f.is_file():
        files.append(f)
        if opts.adapter.endswith(".py") or ":" not in opts.adapter:
            near = sorted({p for pat in SIBLINGS for p in f.parent.glob(pat) if p.is_file() and p != f})
            files += near[:MAX_SIBLINGS]
    if opts.vocab and opts.vocab != "bytes" and Path(opts.vocab).is_file():
        files.append(Path(opts.vocab))
    return files


def gather(job, opts, params: dict, gc):
    return lm.gather_lm(job, opts, params, gc, load_subject)


LACKS = {  # probe need -> why an adapter without the part cannot meet it
    "activations": "the adapter declares no attention (Adapted.attention)",
    "run_from_layer": "the adapter does not declare embed, blocks and unembed, so vectors cannot be run from a layer",
    "sae": "SAE features run on TransformerLens models only",
}


def load_subject(ref, opts, device: str):
    """The LMSubject of the user's model: the adapter's facade, vocabulary and special tokens."""
    from ..data.tokens import MASK_NAMES, PAD_NAMES, load_vocab, special_id
    from ..models.adapted import load_adapted
    from ..models.lm import LMSubject

    model, a = load_adapted(opts.adapter, ref.path, device)
    cfg = model.cfg
    if a.vocab:
        vocab, vocab_src, byte_level = list(a.vocab), f"the adapter ({Path(opts.adapter).name})", False
        vocab += [f"<{i}>" for i in range(len(vocab), cfg.d_vocab)]
    else:
        vocab, vocab_src, byte_level = load_vocab(opts.vocab, ref.path, cfg.d_vocab)
    mask_id = lm.resolve_mask_id(opts.mask_id, special_id(vocab, MASK_NAMES, a.mask_id, cfg.d_vocab), cfg.d_vocab)
    pad_id = special_id(vocab, PAD_NAMES, a.pad_id, cfg.d_vocab)
    rows = [("model", a.name or type(a.model).__name__, "adapter"), ("n_layers", cfg.n_layers, "adapter"),
            ("n_heads", cfg.n_heads, "adapter"), ("d_model", cfg.d_model or "not declared", "adapter"),
            ("d_vocab", cfg.d_vocab, "logits"), ("n_ctx", cfg.n_ctx, "adapter"),
            ("attention", cfg.attention_dir, "adapter")]
    shown = {k: str(v) for k, v, _ in rows}
    for k, v in a.config.items():  # the adapter's own config rows, less those that repeat a row above
        if str(k) in shown and shown[str(k)] == str(v):
            continue
        rows.append((f"{k} (checkpoint)" if str(k) in shown else k, v, "checkpoint"))
    lacks = {}
    if a.attention is None:
        lacks["activations"] = LACKS["activations"]
    if not model.chain:
        lacks["run_from_layer"] = LACKS["run_from_layer"]
    lacks["sae"] = LACKS["sae"]
    subject = LMSubject(ref=ref, model=model, format="adapter", causal=bool(a.causal), config_rows=rows, vocab=vocab,
                        vocab_source=vocab_src, byte_level=byte_level, mask_id=mask_id, pad_id=pad_id,
                        encode=a.encode, lacks=lacks,
                        meta={"name": a.name or type(a.model).__name__, "adapter": str(opts.adapter)})
    lm.set_dtype(subject, opts.dtype)
    return subject
