"""The `lm` kind: seed-004 RestorationModel checkpoints and saved TransformerLens models, read into a
HookedTransformer. Also the shared part of every language-model kind (`gather_lm`): tokens → (SAE) → one probe
pass for the needs the chosen analyses declare → analyses; report meta and page context. Other language-model
kinds (hf, adapter) differ only in how they load the subject (`load_subject`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReportgenError, first_line
from . import freeze_loaded

NAME = "lm"
DESCRIPTION = "seed-004 RestorationModel, TransformerLens"
SUBJECT = "lm"
METRICS = {"loss": ("loss (nats)", "num")}  # the kind's own headline metric (the analyses name theirs)


@dataclass
class Options:
    """The build options a language-model report depends on (the cache digest covers these)."""

    vocab: str | None = None
    seq_len: int = 0
    max_seqs: int = 256
    mask_rate: float = 0.15
    mask_id: int | None = None
    sae: list = None  # SAE folders
    prompts: list = None
    prompt_files: list = None
    train_sae: int | None = None
    sae_arch: str = "topk"
    sae_tokens: int = 200_000
    samples: int = 5
    seed: int = 0
    dtype: str = "float32"
    trust_checkpoint: bool = False


LM_MARKERS = ((b"model_state_dict", b"config", b"d_model"),  # seed 004
              (b"state_dict", b"cfg", b"W_E"))  # {cfg, state_dict} of a HookedTransformer


def sniff(path: Path) -> bool:
    from ..checkpoints import pickle_head

    if not path.is_file():
        return False
    head = pickle_head(path) or b""
    return b"HookedTransformer" in head or any(all(m in head for m in ms) for ms in LM_MARKERS)


def check(ref, opts) -> None:
    """A language model needs --data, in a dtype it can run in."""
    if not opts.data:
        raise ReportgenError(f"{ref.path}: a language-model checkpoint needs --data (a UTF-8 text file, a .npy/.pt "
                             f"token array or a datasets folder)")
    if not Path(opts.data).exists():
        raise ReportgenError(f"{opts.data}: evaluation data not found (--data)")
    if opts.dtype == "config":
        raise ReportgenError("--dtype config is for TRM checkpoints; a language model runs in float32, bfloat16 or float16")


def inputs(ref, opts) -> list[Path]:
    """The evaluation data, the vocabulary and the SAE: files besides the checkpoint whose bytes the report
    depends on."""
    files = data_files(opts)
    vocab = Path(opts.vocab) if opts.vocab and opts.vocab != "bytes" else ref.path.parent / "vocab.json"
    if vocab.is_file():
        files.append(vocab)
    return files


def data_files(opts) -> list[Path]:
    """--data and --sae files (for every language-model kind's inputs)."""
    files = []
    data = Path(opts.data)
    files += sorted(q for q in data.rglob("*") if q.is_file()) if data.is_dir() else [data]
    for folder in opts.sae or []:
        files += sorted(q for q in Path(folder).glob("*") if q.is_file())
    files += [Path(f) for f in opts.prompt_files or []]
    return files


def gather(job, opts, params: dict, gc):
    return gather_lm(job, opts, params, gc, load_subject)


def load_subject(ref, opts, device: str):
    """The LMSubject of a seed-004 or TransformerLens checkpoint."""
    from ..data.tokens import MASK_NAMES, PAD_NAMES, load_vocab, special_id
    from ..models.lm import LMSubject, load_model, read_checkpoint, sniff as sniff_format

    require_lm_extras(ref.path, opts)
    obj = read_checkpoint(ref.path, opts.trust_checkpoint)
    fmt = sniff_format(obj)
    if fmt is None:
        raise ReportgenError(f"{ref.path}: not a language-model checkpoint reportgen knows (expected "
                             f"{{model_state_dict, config, vocab_size}} or {{cfg, state_dict}})")
    model, causal, rows, declared = load_model(ref.path, obj, fmt, device)
    del obj  # the model holds its own copy of the weights
    cfg = model.cfg
    vocab, vocab_src, byte_level = load_vocab(opts.vocab, ref.path, cfg.d_vocab)
    mask_id = resolve_mask_id(opts.mask_id, special_id(vocab, MASK_NAMES, declared["mask"], cfg.d_vocab), cfg.d_vocab)
    pad_id = special_id(vocab, PAD_NAMES, declared["pad"], cfg.d_vocab)
    subject = LMSubject(ref=ref, model=model, format=fmt, causal=causal, config_rows=rows, vocab=vocab,
                        vocab_source=vocab_src, byte_level=byte_level, mask_id=mask_id, pad_id=pad_id)
    set_dtype(subject, opts.dtype)
    return subject


def set_dtype(subject, dtype: str) -> None:
    """Run the subject's model in `dtype` (float32, bfloat16, float16)."""
    if dtype in (None, "float32", "config") or subject.dtype == dtype:
        return
    import torch

    subject.model.to(getattr(torch, dtype))
    subject.model.cfg.dtype = getattr(torch, dtype)
    subject.dtype = dtype


def resolve_layer(layer: int, n_layers: int, what: str) -> int:
    r = n_layers - 1 if layer == -1 else layer
    if not 0 <= r <= n_layers:
        raise ReportgenError(f"{what}: layer {layer} is out of range (the model has layers 0..{n_layers - 1}; "
                             f"{n_layers} means the final norm and unembedding only, -1 the last block)")
    return r


LM_EXTRA = {"transformer_lens": "transformer-lens", "sae_lens": "sae-lens", "datasets": "datasets"}


def require_lm_extras(path: Path, opts) -> None:
    """One line naming what to install when the packages of the `lm` extra are missing, before any of
    them is imported deep inside loading (TRM reports never need them)."""
    import importlib

    need = ["transformer_lens"]
    if opts.sae or opts.train_sae is not None:
        need.append("sae_lens")
    if opts.train_sae is not None or (opts.data and Path(opts.data).is_dir()):
        need.append("datasets")
    for mod in need:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ReportgenError(f"{path}: language-model reports need {LM_EXTRA[mod]}, which cannot be imported "
                                 f"({first_line(e, 80)}): pip install 'reportgen[lm]'") from None
EVAL_CAP_TOKENS = 2**18  # --eval all: at most this many tokens' worth of sequences (the report says when it applies)


def eval_cap(seq_len: int) -> int:
    """Sequences --eval all runs the loss over at most."""
    return max(1, EVAL_CAP_TOKENS // seq_len)


def resolve_mask_id(flag: int | None, found: int | None, d_vocab: int) -> int | None:
    """The mask token id: --mask-id when given (it wins), else the config's or the vocabulary's."""
    if flag is None:
        return found
    if not 0 <= flag < d_vocab:
        raise ReportgenError(f"--mask-id {flag}: outside the model's vocabulary (ids 0..{d_vocab - 1})")
    return int(flag)


def gather_lm(job, opts, params: dict, gc, load):
    """Every language-model kind's report: `load(ref, opts, device) -> LMSubject`, then tokens, SAE, one probe
    pass and the analyses. Returns the report's Gathered (nothing is written here)."""
    import numpy as np

    import analyses

    from . import Gathered
    from ..data.tokens import MASK_NAMES, load_tokens, mask_tokens
    from ..config import eval_count, memory_budget
    from ..probes.lm import check_run_from_memory, merge_needs, probe_lm
    from ..text import uncovered_note

    ref = job.ref
    device, timer, log, progress = gc.device, gc.timer, gc.log, gc.make_progress("sequences")
    budget = memory_budget(opts)
    with timer("load"):
        subject = load(ref, opts, device)
        model, causal, vocab, mask_id, pad_id = subject.model, subject.causal, subject.vocab, subject.mask_id, subject.pad_id
        vocab_src, byte_level = subject.vocab_source, subject.byte_level
        cfg = model.cfg
        glyphs = uncovered_note(vocab[:cfg.d_vocab])  # also adds installed fonts for the vocabulary's scripts
        if glyphs:
            subject.notes.append(glyphs)
        seq_len = opts.seq_len or min(128, cfg.n_ctx)
        if seq_len > cfg.n_ctx:
            raise ReportgenError(f"--seq-len {seq_len} is longer than the model's context ({cfg.n_ctx})")
        want, cap = eval_count(opts), eval_cap(seq_len)
        limit = max(want if want is not None else cap + 1, opts.max_seqs)
        tokens = load_tokens(Path(opts.data), vocab, byte_level, cfg.d_vocab, seq_len, limit, encode=subject.encode)
        capped = want is None and len(tokens) > cap
        n_eval = min(want if want is not None else cap, len(tokens))
        n_act = min(opts.max_seqs, len(tokens))
        tokens = tokens[:max(n_eval, n_act)]
        if causal:
            inputs, scored = tokens, np.ones(tokens.shape, dtype=bool)
            scored[:, -1] = False
        else:
            if mask_id is None:
                raise ReportgenError(f"{ref.path}: a bidirectional (masked) model needs a mask token: none in the "
                                     f"config (mask_token_id) or the vocabulary ({'/'.join(MASK_NAMES)}) from {vocab_src}; "
                                     f"pass --mask-id ID")
            inputs, scored = mask_tokens(tokens, opts.mask_rate, mask_id, opts.seed,
                                         protect=tuple(i for i in (pad_id,) if i is not None))
            if not scored.any():
                raise ReportgenError(f"--mask-rate {opts.mask_rate}: no position was masked in {tokens.size} tokens")
    selected = [m for m in analyses.for_subject("lm") if not opts.only or m.NAME in opts.only]
    for m in list(selected):  # an analysis whose needs this model cannot meet is left out, with a note
        unmet = [k for k in m.needs(params[m.NAME]) if not subject.supports(k)]
        if unmet and (unmet != ["sae"] or opts.sae or opts.train_sae is not None):  # no SAE asked: no note
            subject.notes.append(f"{m.TITLE} is left out: {subject.lacks[unmet[0]]}.")
        if unmet:
            selected.remove(m)
    saes, sae_infos = [], []
    have_sae = bool(opts.sae or opts.train_sae is not None)
    for m in [m for m in selected if "sae" in m.needs(params[m.NAME])]:
        if not have_sae:  # an analysis of an SAE runs only when there is one
            if opts.only and m.NAME in opts.only:
                raise ReportgenError(f"--only {m.NAME} needs an SAE: pass --sae DIR or --train-sae LAYER")
            selected.remove(m)
    want_sae = have_sae and any("sae" in m.needs(params[m.NAME]) for m in selected)
    sae_dir = None
    if want_sae:
        from ..probes.sae import Spliced
        from ..sae import load_sae, temp_folder, train_sae

        if opts.sae:
            with timer("load"):
                for folder in opts.sae:
                    sae, info = load_sae(Path(folder), model, device)
                    saes.append(Spliced(sae, Path(folder).name))
                    sae_infos.append(info)
        else:
            sae_dir = temp_folder()
            log(f"  training an SAE ({opts.sae_arch}) on blocks.{opts.train_sae}.hook_resid_post with SAELens, "
                f"{opts.sae_tokens:,} tokens")
            with timer("train_sae"):
                sae, info = train_sae(model, inputs, opts.train_sae, sae_dir, device, arch=opts.sae_arch,
                                      training_tokens=opts.sae_tokens, seed=opts.seed, label=ref.run)
            info["folder"] = "sae/"
            saes.append(Spliced(sae, "sae/"))
            sae_infos.append(info)
    prompt_ids = prompt_tokens(opts, params, subject, cfg.n_ctx) if want_sae else []
    for sp in saes:  # given feature ids, checked before the pass
        bad = [f for f in getattr(params.get("sae_features"), "ids", []) if not 0 <= f < sp.d_sae]
        if bad:
            raise ReportgenError(f"sae_features.ids: feature id {bad[0]} is out of range (the SAE at {sp.hook} has "
                                 f"features 0..{sp.d_sae - 1})")
    asked = []
    for m in selected:  # each analysis' needs, with layers resolved against this model
        need = m.needs(params[m.NAME])
        if "run_from_layer" in need:
            rf = dict(need["run_from_layer"])
            rf["layer"] = resolve_layer(int(rf["layer"]), cfg.n_layers, m.NAME)
            check_run_from_memory(rf, cfg, budget, m.NAME)
            need = {**need, "run_from_layer": rf}
        if "sae" in need and prompt_ids:
            need = {**need, "sae": {**need["sae"], "prompts": prompt_ids}}
        asked.append(need)
    needs = merge_needs(asked)
    log(f"  probing {tokens.shape[0]} sequences × {tokens.shape[1]} tokens on {device} (loss over {n_eval}"
        + (f", capped at {cap}: --eval N for more" if capped else "") + f"; activations over {n_act})"
        + (f" with {'SAEs' if len(saes) > 1 else 'the SAE'} at {', '.join(sp.hook for sp in saes)}" if saes else ""))
    freeze_loaded()
    with timer("probe"):
        trace = probe_lm(subject, tokens, inputs, scored, needs, device, budget=budget, samples=max(opts.samples, 1),
                         sae=saes or None, progress=progress, n_eval=n_eval, n_act=n_act, log=log)
    trace.metrics["eval_cap"] = cap if capped else None
    sections, metrics = [], {}
    for n, mod in enumerate(selected, 1):
        with timer("analyses"):
            try:
                data = mod.compute(trace, params[mod.NAME])
            except ValueError as e:
                raise ReportgenError(f"{mod.NAME}: {e}") from None
            if hasattr(mod, "metrics"):
                metrics.update(mod.metrics(data))
        with timer("figures"):
            figs = mod.figures(data, params[mod.NAME])
        sections.append({"name": mod.NAME, "title": mod.TITLE, "anchor": mod.NAME.replace("_", "-"), "data": data,
                         "figures": figs, "module": mod})
    prepared = {"subject": subject, "trace": trace, "sections": sections, "metrics": metrics, "sae_infos": sae_infos,
                "tokens": tokens}
    meta = lm_meta(job, opts, prepared, device)
    return Gathered(meta, lm_context(meta, prepared), trace, sections, {"sae": sae_dir} if sae_dir else {})


def lm_meta(job, opts, prepared: dict, device: str) -> dict:
    import torch

    from ..stats import bootstrap_mean

    s = prepared["subject"]
    tr = prepared["trace"]
    ref = job.ref
    meta = {
        "run": ref.run, "name": ref.name, "step": ref.step, "path": f"{ref.run}/{ref.name}/", "kind": job.kind.NAME,
        "checkpoint": {"path": str(ref.path), "sha256": job.sha, "bytes": ref.bytes, "format": s.format,
                       "config": None},
        "dataset": {"path": str(opts.data), "found_by": "--data", "sequences": int(tr.metrics["n_seqs"]),
                    "activation_sequences": int(tr.metrics["n_act"]), "eval_cap": tr.metrics.get("eval_cap"),
                    "seq_len": int(tr.tokens.shape[1]), "batch_size": int(tr.metrics["batch_size"]),
                    "max_memory": opts.max_memory, "task": "next-token" if s.causal else "masked",
                    "mask_rate": None if s.causal else opts.mask_rate, "seed": opts.seed},
        "model": {"layers": s.cfg.n_layers, "d_model": s.cfg.d_model, "heads": s.cfg.n_heads, "d_vocab": s.cfg.d_vocab,
                  "attention": "causal" if s.causal else "bidirectional", "vocab": s.vocab_source,
                  "mask_id": s.mask_id, **s.meta},
        "sae": sae_source(prepared["sae_infos"][0], ref) if prepared["sae_infos"] else None,
        "saes": [sae_source(i, ref) for i in prepared["sae_infos"]],
        "compute": {"device": device, "dtype": s.dtype, "arithmetic": tr.metrics.get("arithmetic", s.dtype)},
        "analyses": [x["name"] for x in prepared["sections"]],
        "metrics": {**({"loss": bootstrap_mean(tr.token_loss)} if tr.token_loss is not None else {}), **prepared["metrics"]},
        "versions": {"reportgen": __import__("reportgen._version", fromlist=["_"]).__version__, "torch": torch.__version__.split("+")[0],
                     "transformer_lens": _version("transformer-lens"),
                     **({"sae_lens": _version("sae-lens")} if prepared["sae_infos"] else {})},
    }
    return meta


def prompt_tokens(opts, params, subject, n_ctx: int) -> list:
    """The prompts of the SAE view (--prompt, --prompt-file, sae_features.prompts) as token id arrays, each
    within the model's context."""
    from ..data.tokens import encode_text

    texts = [(t, "--prompt") for t in list(params["sae_features"].prompts) + list(opts.prompts or [])]
    for f in opts.prompt_files or []:
        try:
            texts.append((Path(f).read_text(encoding="utf-8").rstrip("\n"), f))
        except UnicodeDecodeError as e:
            raise ReportgenError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for text, where in texts:
        ids = encode_text(text, subject.vocab, subject.byte_level, subject.encode, where)
        if not len(ids):
            raise ReportgenError(f"{where}: the prompt is empty")
        if len(ids) > n_ctx:
            raise ReportgenError(f"{where}: the prompt has {len(ids)} tokens, longer than the model's context ({n_ctx})")
        out.append(ids)
    return out


def sae_source(info: dict | None, ref) -> dict | None:
    """The SAE's description plus `trained_on_this`: True when it was trained on this checkpoint (by --train-sae,
    or its cfg's model_name names this checkpoint), False when its cfg names another one, None when it names none."""
    if not info:
        return info
    rec = info.get("trained_on")
    if info.get("folder") == "sae/":
        same = True
    elif not rec:
        same = None
    else:
        same = rec in (f"{ref.run}/{ref.name}", str(ref.path)) or Path(rec).name in (ref.name, ref.path.name)
    return {**info, "trained_on_this": same}


def sae_note(sae: dict | None, here: str) -> str | None:
    """The page's note when the SAE comes from another checkpoint, or does not say where it comes from."""
    if not sae or sae.get("trained_on_this"):
        return None
    if sae["trained_on_this"] is False:
        return (f"The SAE ({sae['folder']}) was trained on {sae['trained_on']}, a different checkpoint: its features "
                f"describe that checkpoint's activations and are applied here to {here}.")
    return (f"The SAE ({sae['folder']}) does not record which model it was trained on (no model_name in its cfg.json); "
            f"it may come from a different checkpoint than {here}.")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def lm_context(meta: dict, prepared: dict) -> dict:
    from ..probes.lm import TRACE_ARRAYS

    s, tr = prepared["subject"], prepared["trace"]
    step = meta["step"]
    title = f"{meta['run']} · step {step}" if step is not None else f"{meta['run']} · {meta['name']}"
    key = f"reportgen:{meta['run']}:{meta['name']}".replace(" ", "_")
    bib = (f"@misc{{{key},\n  title        = {{{{Language-model report: {meta['run']}, {meta['name']}}}}},\n"
           f"  howpublished = {{reportgen {meta['versions']['reportgen']}}},\n"
           f"  note         = {{Checkpoint {Path(meta['checkpoint']['path']).name}, sha256 {meta['checkpoint']['sha256']}; "
           f"{meta['dataset']['sequences']} sequences of {meta['dataset']['seq_len']} tokens from "
           f"{Path(meta['dataset']['path']).name}}}\n}}")
    shapes = {"tokens": tr.tokens.shape, "inputs": tr.inputs.shape, "scored": tr.scored.shape, "targets": tr.targets.shape,
              **{k: v.shape for k, v in tr.arrays.items()}}
    notes = [n for n in (sae_note(x, f"{meta['run']}/{meta['name']}") for x in meta.get("saes") or []) if n]
    return {"meta": meta, "title": title, "config_rows": s.config_rows, "run_rows": [], "notes": s.notes + notes,
            "sections": prepared["sections"], "bibtex": bib, "site_root": "../../", "kind_title": "Language-model report",
            "config_caption": f"({meta['checkpoint']['format']} checkpoint)",
            "trace_note": " (N sequences of T tokens, S shown sequences, k top predictions)",
            "trace_arrays": [(k, list(shapes[k]), d) for k, d in TRACE_ARRAYS.items() if k in shapes]}
