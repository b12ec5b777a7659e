"""The `hf` kind: Hugging Face model folders (`config.json`, `*.safetensors` or `pytorch_model.bin`, tokenizer
files), run folders of Hugging Face Trainer checkpoints (`checkpoint-N/`), and model ids found in the local
Hugging Face cache (`--ckpt gpt2`). The model is converted into a HookedTransformer with TransformerLens'
own config mapping and weight converters, fully offline, and runs through the shared language-model report
(`lm.gather_lm`).

Loading reads `config.json` itself and hands TransformerLens a copy of it in a neutrally named folder:
TransformerLens 3.9 picks the architecture from the path's *name* when it contains "llama" or "gemma"
(../shared/specs/huggingface.md), and a user's folder is normally called `Llama-3.2-1B`. The converted
weights are views of the Hugging Face model's tensors, assigned into the HookedTransformer without a copy, so
the model's weights are held once.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import ReportgenError, first_line
from . import lm

NAME = "hf"
DESCRIPTION = "Hugging Face model folders: config.json with safetensors or pytorch_model.bin, checkpoint-N runs, cached model ids"
SUBJECT = "lm"
METRICS = lm.METRICS

Options = lm.Options  # the language-model options (--dtype, --seq-len, --sae, ...); nothing of its own

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
ROTARY_CTX = 2048  # rotary models: TransformerLens' per-layer mask buffers are sized by n_ctx (n_ctx² each)


def _config(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def sniff(path: Path) -> bool:
    """A folder with a Hugging Face `config.json` (one that names a model type or architecture)."""
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    cfg = _config(path)
    if cfg is None:  # an unreadable config.json is still this kind's file: check() says what is wrong
        return True
    return bool(cfg.get("model_type") or cfg.get("architectures"))


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    return files or [p for p in (path / "pytorch_model.bin",) if p.is_file()] or sorted(path.glob("pytorch_model-*.bin"))


def tokenizer_dir(path: Path) -> Path | None:
    """The folder of the model's tokenizer: the checkpoint folder, else (a Trainer's checkpoint-N) the run's."""
    for d in (path, path.parent):
        if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
            if d == path or (d / "config.json").is_file() or STEP_FOLDER.match(path.name):
                return d
    return None


STEP_FOLDER = re.compile(r"^checkpoint-\d+$")


def check(ref, opts) -> None:
    lm.check(ref, opts)
    path = ref.path
    cfg = _config(path)
    if cfg is None:
        raise ReportgenError(f"{path / 'config.json'}: not a readable JSON config")
    if not weight_files(path):
        raise ReportgenError(f"{path}: no weights (model.safetensors, *.safetensors shards or pytorch_model.bin) "
                             f"beside config.json")
    if tokenizer_dir(path) is None:
        raise ReportgenError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt) in the "
                             f"folder{' or its run folder' if STEP_FOLDER.match(path.name) else ''}; save it there with "
                             f"tokenizer.save_pretrained(...)")


def inputs(ref, opts) -> list[Path]:
    """The evaluation data, the SAE, and the tokenizer files when they come from the run folder (those in the
    checkpoint folder are part of the checkpoint's own digest)."""
    files = lm.data_files(opts)
    tdir = tokenizer_dir(ref.path)
    if tdir is not None and tdir != ref.path:
        files += [tdir / f for f in TOKENIZER_FILES if (tdir / f).is_file()]
    return files


def resolve(spec: str):
    """A model id (`gpt2`, `EleutherAI/pythia-70m`) found in the local Hugging Face cache, as a CheckpointRef
    (run = the id, name = the cached revision); None when the id is not cached. Never touches the network."""
    if not MODEL_ID.match(spec) or spec.endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors")):
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        folder = Path(snapshot_download(repo_id=spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError and friends)
        return None
    if not sniff(folder):
        return None
    from ..checkpoints import CheckpointRef, safe_name

    return CheckpointRef(path=folder, run=safe_name(spec.replace("/", "--")), name=safe_name(folder.name[:12]), step=None)


def gather(job, opts, params: dict, gc):
    g = lm.gather_lm(job, opts, params, gc, load_subject)
    from importlib.metadata import version

    g.meta["versions"]["transformers"] = version("transformers")  # the page's context holds the same dict
    return g


def _offline() -> None:
    """No network from here on (set before transformers and huggingface_hub first read them)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Attributes TransformerLens 3.9 reads from a transformers config that transformers 5 no longer sets: where the
# value lives now. Only for the conversion, and only where the config object lacks the attribute.
MOVED_ATTRIBUTES = (
    ("PhiConfig", "partial_rotary_factor", lambda c: (c.rope_parameters or {}).get("partial_rotary_factor", 1.0)),
    ("GPT2Config", "n_ctx", lambda c: c.n_positions),  # written only when the config names it
)


@contextmanager
def _moved_attributes():
    import transformers

    added = []
    for cls_name, attr, where in MOVED_ATTRIBUTES:
        cls = getattr(transformers, cls_name, None)
        if cls is None or hasattr(cls, attr):
            continue

        def get(c, attr=attr, where=where):
            return c.__dict__[attr] if attr in c.__dict__ else where(c)

        def put(c, v, attr=attr):
            c.__dict__[attr] = v

        setattr(cls, attr, property(get, put))
        added.append((cls, attr))
    try:
        yield
    finally:
        for cls, attr in added:
            delattr(cls, attr)


def tl_config(path: Path, hf: dict, dtype, device: str, n_ctx_needed: int):
    """The HookedTransformerConfig TransformerLens maps `config.json` to, read through a neutrally named copy
    (see the module docstring); ReportgenError for an architecture it cannot convert."""
    import shutil
    import tempfile

    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    arch = (hf.get("architectures") or [None])[0]
    tmp = Path(tempfile.mkdtemp(prefix="reportgen-"))
    try:
        neutral = tmp / "model"
        neutral.mkdir()
        shutil.copyfile(path / "config.json", neutral / "config.json")
        try:
            with _moved_attributes():
                d = convert_hf_model_config(str(neutral), local_files_only=True)
        except NotImplementedError:
            raise ReportgenError(f"{path / 'config.json'}: TransformerLens cannot convert the architecture "
                                 f"{arch or hf.get('model_type')}; describe the model with --adapter FILE.py instead "
                                 f"(see the README, 'Your own PyTorch model')") from None
        except Exception as e:  # noqa: BLE001 - a model type transformers does not know, a config missing fields
            raise ReportgenError(f"{path / 'config.json'}: TransformerLens cannot read this config "
                                 f"({arch or hf.get('model_type')}: {first_line(e, 100)}); describe the model with "
                                 f"--adapter FILE.py instead") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    true_ctx = d.get("n_ctx")
    if d.get("positional_embedding_type") in ("rotary", "alibi") and true_ctx and true_ctx > ROTARY_CTX:
        d["n_ctx"] = max(ROTARY_CTX, n_ctx_needed)  # no learned positions: buffers sized for what is run
    d.update(model_name=path.name, tokenizer_name=None, init_weights=False, from_checkpoint=False, dtype=dtype,
             device=device, n_devices=1, default_prepend_bos=d.get("default_prepend_bos", True))
    return HookedTransformerConfig.from_dict(d), true_ctx, arch


def load_hf_model(path: Path, dtype):
    """AutoModelForCausalLM from the folder, offline, weights_only; one line for what does not fit."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                               weights_only=True, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)  # listed in info
    except ValueError as e:
        text = first_line(e, 160)
        if "Unrecognized" in text or "not supported" in text or "does not recognize" in text:
            raise ReportgenError(f"{path / 'config.json'}: transformers does not know this model ({text}); "
                                 f"describe it with --adapter FILE.py instead") from None
        raise ReportgenError(f"{path}: cannot load the model ({text})") from None
    except OSError as e:
        raise ReportgenError(f"{path}: cannot read the weights ({first_line(e, 160)})") from None
    except Exception as e:  # noqa: BLE001 - corrupt files, shape mismatches: the user's input
        text = first_line(e, 200)
        if "size mismatch" in text or "shape" in text:
            raise ReportgenError(f"{path}: config.json does not match the weights ({text})") from None
        raise ReportgenError(f"{path}: cannot load the weights ({type(e).__name__}: {text})") from None
    mism = sorted(info.get("mismatched_keys") or [], key=str)  # transformers 5: a set of (name, found, expected)
    if mism:
        k = mism[0]
        raise ReportgenError(f"{path}: config.json does not match the weights ({k[0] if isinstance(k, tuple) else k}: "
                             f"{' vs '.join(str(list(s)) for s in k[1:]) if isinstance(k, tuple) else 'shape mismatch'})")
    missing = [k for k in info.get("missing_keys") or [] if not k.endswith(("rotary_emb.inv_freq", ".masked_bias", ".attn.bias"))]
    if missing:
        raise ReportgenError(f"{path}: the weights lack {len(missing)} tensor(s) the config needs (e.g. {sorted(missing)[0]}); "
                             f"config.json does not match the weights")
    return model.eval()


def convert(path: Path, hf_model, cfg):
    """The HookedTransformer holding hf_model's weights through TransformerLens' converter for its architecture."""
    import warnings

    import torch
    from transformer_lens.loading_from_pretrained import fill_missing_keys, get_pretrained_state_dict

    from ..checkpoints import check_finite
    from ..models.tl import BUFFER_SUFFIXES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer

        try:
            sd = get_pretrained_state_dict(str(path), cfg, hf_model=hf_model, dtype=cfg.dtype)
        except (ValueError, KeyError, AttributeError) as e:
            raise ReportgenError(f"{path}: TransformerLens could not convert the weights ({first_line(e, 140)}); "
                                 f"describe the model with --adapter FILE.py instead") from None
        model = HookedTransformer(cfg, move_to_device=False)  # empty (uninitialised) parameters, replaced below
    check_finite(path, sd)
    sd = fill_missing_keys(model, sd)  # zero biases the architecture does not have, TransformerLens' buffers
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ReportgenError(f"{path}: config.json does not match the weights ({bad[0]} converts to "
                             f"{list(sd[bad[0]].shape)}, the config needs {list(own[bad[0]].shape)})")
    missing = [k for k in own if k not in sd and not k.endswith(BUFFER_SUFFIXES)]
    if missing:
        raise ReportgenError(f"{path}: the converted weights lack {missing[0]}")
    with torch.no_grad():
        sd = {k: (v if v.dtype == cfg.dtype else v.to(cfg.dtype)) for k, v in sd.items() if k in own}
        model.load_state_dict(sd, strict=False, assign=True)  # the HF tensors themselves (views), not copies
    for p in model.parameters():
        p.requires_grad_(True)  # gradient-flow analyses take gradients of the weights
    return model.eval()


def load_subject(ref, opts, device: str):
    """The LMSubject of a Hugging Face folder: its HookedTransformer, readable vocabulary and tokenizer."""
    import gc

    import torch

    from ..models.lm import LMSubject

    _offline()
    lm.require_lm_extras(ref.path, opts)
    path = ref.path
    hf = _config(path) or {}
    dtype = getattr(torch, opts.dtype)
    tdir = tokenizer_dir(path)
    tok = load_tokenizer(tdir)
    cfg, true_ctx, arch = tl_config(path, hf, dtype, device, opts.seq_len or 128)
    hf_model = load_hf_model(path, dtype)
    model = convert(path, hf_model, cfg)
    del hf_model
    gc.collect()
    model.to(device, print_details=False)
    vocab = readable_vocab(tok, cfg.d_vocab)
    rows = [("architecture", arch, "config.json"), ("model_type", hf.get("model_type"), "config.json")]
    rows += [(k, getattr(cfg, k), "TransformerLens cfg") for k in
             ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab", "act_fn",
              "normalization_type", "positional_embedding_type", "rotary_base", "gated_mlp")
             if getattr(cfg, k, None) is not None]
    rows.append(("n_ctx", true_ctx if true_ctx == cfg.n_ctx else f"{true_ctx} (run up to {cfg.n_ctx})", "config.json"))
    rows.append(("tokenizer", f"{type(tok).__name__}, {len(tok):,} tokens", str(tdir)))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None and tok.pad_token_id < cfg.d_vocab else None

    def encode(text: str):
        return tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    subject = LMSubject(ref=ref, model=model, format=f"Hugging Face ({arch})", causal=True, config_rows=rows, vocab=vocab,
                        vocab_source=f"the tokenizer in {tdir}", byte_level=False, mask_id=None, pad_id=pad_id,
                        encode=encode, dtype=opts.dtype, meta={"architecture": arch, "name": path.name})
    return subject


def load_tokenizer(tdir: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer folder is the user's input
        raise ReportgenError(f"{tdir}: cannot load the tokenizer ({type(e).__name__}: {first_line(e, 140)})") from None


# ---------------------------------------------------------------- token strings as people read them

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict:
    """The reversible byte <-> printable character table of byte-level BPE (GPT-2, Llama 3, Qwen): bytes that
    are printable Latin-1 stand for themselves, the others are shifted to code points from 256 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001
        return False

    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("decoder")) or has(spec.get("pre_tokenizer"))


def _bytes_text(b: bytes) -> str:
    """UTF-8 text, with each byte that is no complete character shown as \\xNN."""
    out, i = [], 0
    while i < len(b):
        for n in (1, 2, 3, 4):
            try:
                out.append(b[i:i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"\\x{b[i]:02x}")
            i += 1
    return "".join(out)


def readable_vocab(tok, d_vocab: int) -> list[str]:
    """Each token id's string as a reader sees it: the BPE space marker (Ġ, ▁) as a space, byte-level pieces as
    the text their bytes spell, byte tokens (<0xE2>) and incomplete UTF-8 as \\xNN; special tokens as named."""
    n = min(len(tok), d_vocab)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tok, "all_special_tokens", []) or [])
    special |= {t.content if hasattr(t, "content") else str(t) for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values()}
    byte_level = _is_byte_level(tok)
    table = _byte_decoder() if byte_level else {}
    out = []
    for i, p in enumerate(pieces):
        if p is None:
            out.append(f"#{i}")
            continue
        m = BYTE_TOKEN.match(p)
        if m:
            out.append(_bytes_text(bytes([int(m.group(1), 16)])))
        elif p in special:
            out.append(p)
        elif byte_level and all(c in table for c in p):
            out.append(_bytes_text(bytes(table[c] for c in p)))
        else:
            out.append(p.replace("\u2581", " "))
    return out + [f"#{i}" for i in range(n, d_vocab)]
