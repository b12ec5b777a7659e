"""The language-model probe: one activation pass over the evaluation tokens, shared by every analysis.

Analyses declare what they need (`needs(params)` → dict) in generic terms the probe knows — it knows no
analysis by name:

- `logits: {top_k}`: the top-k predictions at every position of the drawn sequences (the loss and accuracy
  over the evaluation sequences are always computed);
- `activations: {hook point: {reduce, ...}}`: an activation at a hook point of every block, reduced on the fly
  (`attn.hook_pattern` with `reduce: entropy`, keeping the `window` × `window` pattern of sequence `sample`);
- `gradients: {batch}`: the gradient of the mean loss over the first `batch` sequences, per parameter;
- `run_from_layer: {layer, count, vectors, batch_size}`: `count` vectors made by `vectors(rows, d_model)`
  entering the residual stream before block `layer`, read out as their top-1 token and its probability;
- `sae: {loss_seqs, variance_seqs}`: the SAE's codes, reconstruction and spliced-in loss.

The probe merges the needs and runs the model once over the tokens in batches, with hooks that reduce each hooked activation on the fly
(attention entropy, SAE codes), so memory stays bounded. Only what cannot come from that pass runs
apart: the gradient of one batch's loss, token-map grid vectors (they are not text), and the loss
with the SAE spliced in (the clean pass must not be altered), on a subsample of sequences.

Memory: the batch size comes from a budget (`--max-memory`) and the model's dimensions
(`forward_bytes`): one batch's logits and one layer's attention patterns at a time, never all
layers' patterns and never the logits of all sequences. Per batch, the logits are reduced to what the
statistics need (per-token loss, top-1 hits, the top-k of the few sequences drawn) and the patterns to
per-sequence entropy sums; the gradient batch runs as micro-batches whose gradients add up, and the
token-map grid in batches sized the same way. So the peak is the weights plus the budget whatever
the sequence length, the number of sequences, layers or heads.

Which sequences: the first `n_eval` rows of the tokens get the loss and accuracy (`--eval`); the
first `n_act` rows also feed the activation analyses (attention entropy, SAE codes; `--max-seqs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ReportgenError
from .common import layer_of, loss_terms  # noqa: F401 - also used from here by kinds and tests

F32 = 4
CPU_BATCH_TOKENS = 4096
DEFAULT_BUDGET = 2 * 2**30


@dataclass
class LMTrace:
    tokens: np.ndarray  # [N,T] original tokens
    inputs: np.ndarray  # [N,T] what the model saw (masked for a restoration model)
    scored: np.ndarray  # [N,T] bool: positions the loss is taken at (masked, or next-token)
    targets: np.ndarray  # [N,T] target token per position (original, or the next token)
    vocab: list  # token strings
    causal: bool
    mask_id: int | None
    n_layers: int
    n_heads: int
    metrics: dict = field(default_factory=dict)  # loss, accuracy, n_scored, n_seqs (evaluation), n_act, ...
    arrays: dict = field(default_factory=dict)  # top_ids, top_probs, ... (saved to data/trace.npz)
    token_loss: np.ndarray | None = None  # [n_scored] float32 cross-entropy of every scored evaluation token
    activations: dict = field(default_factory=dict)  # hook point -> its reduced statistics ("activations" needs)
    gradients: list | None = None  # (parameter name, grad norm)  ("gradients" need)
    run_from: dict | None = None  # top-1 readout of vectors run from a layer ("run_from_layer" need)
    sae: list | None = None  # per SAE: streamed feature statistics, reconstruction, spliced-in loss ("sae" need)
    token_predictions: dict | None = None  # top predictions at every activation token (the "sae" need's top_predictions)

    def save(self, path) -> None:
        np.savez_compressed(path, tokens=self.tokens.astype(np.int32), inputs=self.inputs.astype(np.int32),
                            scored=self.scored, targets=self.targets.astype(np.int32),
                            **{k: v for k, v in self.arrays.items()})


PATTERN = "attn.hook_pattern"  # the attention pattern hook of every block

TRACE_ARRAYS = {
    "tokens": "[N,T] int32 evaluation tokens",
    "inputs": "[N,T] int32 model input (masked positions replaced by the mask token for a restoration model)",
    "scored": "[N,T] bool positions the loss and accuracy are taken at",
    "targets": "[N,T] int32 target token per position (the original token, or the next token for a causal model)",
    "top_ids": "[S,T,k] int32 top-k predicted tokens for the first S sequences",
    "top_probs": "[S,T,k] float32 their probabilities",
}


def merge_needs(needs: list[dict]) -> dict:
    out: dict = {}
    for n in needs:
        for k, v in n.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


# ---------------------------------------------------------------- memory budget


def forward_bytes(cfg, seq_len: int, *, logits: bool = True, d_sae: int = 0) -> int:
    """Bytes one sequence of `seq_len` tokens holds in flight in an inference forward pass (float32).

    Only one layer is alive at a time: its residual-stream, q/k/v/z and MLP activations, and its
    attention scores and pattern with the entropy hook's temporaries (about six [H,T,T] arrays); then
    the logits with their log-softmax temporaries (three [T,V]) and an SAE's dense codes (two [T,d_sae])."""
    T, D, F, H, V = seq_len, cfg.d_model, cfg.d_mlp or 4 * cfg.d_model, cfg.n_heads, cfg.d_vocab
    layer = F32 * T * (10 * D + 3 * F) + F32 * 6 * H * T * T
    out = F32 * 3 * T * V if logits else 0
    return layer + out + F32 * 2 * T * d_sae


def backward_bytes(cfg, seq_len: int) -> int:
    """Bytes one sequence holds for a backward pass: every layer's saved activations and patterns, and
    the logits with their gradient."""
    T, D, F, H, V = seq_len, cfg.d_model, cfg.d_mlp or 4 * cfg.d_model, cfg.n_heads, cfg.d_vocab
    per_layer = F32 * T * (16 * D + 4 * F) + F32 * 6 * H * T * T  # measured: about 6 [H,T,T] per layer
    return cfg.n_layers * per_layer + F32 * 4 * T * V


def checkpointed_bytes(cfg, seq_len: int) -> int:
    """Bytes one sequence holds for a backward pass that recomputes each layer (only the residual stream
    between layers is kept): one layer's saved activations, recomputed, with their gradients and the
    allocator's slack (about four times one layer's, measured on the seed-004 model)."""
    T, D = seq_len, cfg.d_model
    one = (backward_bytes(cfg, seq_len) - F32 * 4 * T * cfg.d_vocab) // cfg.n_layers
    return F32 * T * D * (cfg.n_layers + 1) + 4 * one + F32 * 4 * T * cfg.d_vocab


def batch_size(per_item: int, budget: int, cap: int | None = None) -> int:
    """How many items of `per_item` bytes fit in `budget` (at least one; at most `cap`)."""
    b = max(1, int(budget // max(per_item, 1)))
    return min(b, cap) if cap else b


# ---------------------------------------------------------------- the pass


def probe_lm(subject, tokens: np.ndarray, inputs: np.ndarray, scored: np.ndarray, needs: dict, device: str,
             budget: int = DEFAULT_BUDGET, samples: int = 5, sae=None, progress=None, n_eval: int | None = None,
             n_act: int | None = None, max_batch: int | None = None, log=None) -> LMTrace:
    """One pass over the tokens. n_eval / n_act: the leading rows that get the loss / feed the activation
    analyses (default: all); max_batch caps the batch size the budget gives (for tests). A half-precision model
    on a CPU without native half matmul computes in float32 (models/halfcompute.py)."""
    import contextlib

    from ..models.halfcompute import float32_compute, half_matmul_ratio, wanted

    half = wanted(subject.model, device)
    if half is None:
        ctx = contextlib.nullcontext()
    else:
        ctx = float32_compute(subject.model)
        if log:
            log(f"  {half} weights, float32 arithmetic: this CPU's {half} matmul runs "
                f"{half_matmul_ratio(half):.0f}x slower than float32's")
    with ctx:
        trace = _probe_lm(subject, tokens, inputs, scored, needs, device, budget, samples, sae, progress, n_eval,
                          n_act, max_batch)
    if half is not None:
        trace.metrics["arithmetic"] = "float32"
    return trace


def _probe_lm(subject, tokens, inputs, scored, needs, device, budget, samples, sae, progress, n_eval, n_act,
              max_batch) -> LMTrace:
    import torch

    model = subject.model
    cfg = model.cfg
    N, T = tokens.shape
    n_eval = N if n_eval is None else min(n_eval, N)
    n_act = N if n_act is None else min(n_act, N)
    if subject.causal:
        targets = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    else:
        targets = tokens
    trace = LMTrace(tokens=tokens, inputs=inputs, scored=scored, targets=targets, vocab=subject.vocab,
                    causal=subject.causal, mask_id=subject.mask_id, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    k = int(needs.get("logits", {}).get("top_k", 5))
    S = min(samples, n_act)
    att = needs.get("activations", {}).get(PATTERN)
    if att is not None and att.get("reduce", "entropy") != "entropy":
        raise ValueError(f"activations: {PATTERN} has only the entropy reducer, not {att['reduce']!r}")
    sample = min(int(att.get("sample", 0)), n_act - 1) if att else 0
    shown = min(int(att.get("window", T)), T) if att else 0  # pattern window kept for the heatmaps
    L, H = cfg.n_layers, cfg.n_heads
    ent = {"sum": torch.zeros(L, H, dtype=torch.float64), "sumsq": torch.zeros(L, H, dtype=torch.float64),
           "min": torch.full((L, H), float("inf")), "max": torch.full((L, H), float("-inf"))}
    seq_ent = np.zeros((n_act, L, H), dtype=np.float64) if att else None  # per-sequence mean entropy
    pattern = torch.zeros(L, H, shown, shown)
    from .sae import FeatureStream, Spliced, entry_hook, last_block_kv

    sn = needs.get("sae", {})
    saes = [] if sae is None or "sae" not in needs else [x if isinstance(x, Spliced) else Spliced(x)
                                                          for x in (sae if isinstance(sae, (list, tuple)) else [sae])]
    want_sae = bool(saes)
    loss_seqs = min(int(sn.get("loss_seqs", 8)), n_act) if want_sae else 0
    var_seqs = min(int(sn.get("variance_seqs", 64)), n_act) if want_sae else 0
    n_pred = int(sn.get("top_predictions", 0)) if want_sae else 0  # top predictions at every activation token
    streams = [FeatureStream(sp.d_sae, T, int(sn.get("top_k", 10)), int(sn.get("reservoir", 48)), int(sn.get("context", 8)),
                             int(sn.get("cooc_tokens", 1 << 17)), device, seed=int(sn.get("seed", 0))) for sp in saes]
    recon = [{"err": 0.0, "sum": None, "sq": None} for _ in saes]
    held = {}
    state = {"lo": 0}

    def on_pattern(p, hook):  # [B,H,q,k]
        li = layer_of(hook.name)
        e = torch.special.entr(p).sum(-1)  # [B,H,q]: -sum p log p, 0 where p is 0
        ent["sum"][li] += e.sum((0, 2)).double().cpu()
        ent["sumsq"][li] += (e.double() ** 2).sum((0, 2)).cpu()
        ent["min"][li] = torch.minimum(ent["min"][li], e.amin((0, 2)).cpu())
        ent["max"][li] = torch.maximum(ent["max"][li], e.amax((0, 2)).cpu())
        lo = state["lo"]
        seq_ent[lo:lo + e.shape[0], li] = e.double().mean(-1).cpu().numpy()
        if lo <= sample < lo + p.shape[0]:
            pattern[li] = p[sample - lo, :, :shown, :shown].float().cpu()

    def on_sae_in(i):
        sp = saes[i]

        def hook_fn(x, hook):
            codes = sp.codes(sp.flat(x))
            streams[i].update(codes, state["lo"] * T)
            if sp.transcoder:
                held[i] = codes
            else:
                on_target(i, codes, x)
        return hook_fn

    def on_sae_out(i):
        def hook_fn(x, hook):
            on_target(i, held.pop(i), x)
        return hook_fn

    def on_target(i, codes, x):  # reconstruction error on the first var_seqs sequences (a dense decode costs an encode)
        lo, r = state["lo"], recon[i]
        if lo < var_seqs:
            m = min(var_seqs - lo, x.shape[0]) * T
            sub = saes[i].flat(x)[:m].float()
            r["err"] += (saes[i].decode(codes.dense(m)).float().reshape(sub.shape) - sub).pow(2).sum().item()
            r["sum"] = sub.sum(0) if r["sum"] is None else r["sum"] + sub.sum(0)
            r["sq"] = sub.pow(2).sum(0) if r["sq"] is None else r["sq"] + sub.pow(2).sum(0)

    hooks = []
    if att:
        hooks += [(f"blocks.{i}.{PATTERN}", on_pattern) for i in range(L)]
    for i, sp in enumerate(saes):
        hooks.append((sp.hook, on_sae_in(i)))
        if sp.transcoder:
            hooks.append((sp.out_hook, on_sae_out(i)))
    # Logits over every sequence only when an analysis reads them; an SAE alone stops after its hook layer
    # (the sequences of its clean / spliced loss still run whole).
    last = [layer_of(h) for sp in saes for h in (sp.hook, sp.out_hook)]
    full = bool(att) or "logits" in needs or not want_sae or n_pred > 0 or None in last
    ablate = want_sae and int(sn.get("ablate", 0)) > 0
    if not full and ablate:
        # the ablation of the chosen features needs the stream where its runs start and the clean loss: kept from a
        # whole pass, or recomputed for each (feature, context) pair from the tokens; whichever runs fewer blocks
        pairs = int(sn.get("cards", 0)) * int(sn["ablate"])
        again = pairs * (max(entry_hook(sp, L)[1] for sp in saes) + 2)  # the blocks up to its start, the last twice
        full = again > max(n_act - loss_seqs, 0) * (L - max(last))  # the blocks after the SAE's, and the unembedding
    stop = None if full else max(last) + 1
    d_sae = sum(sp.d_sae for sp in saes)
    end = max(n_eval, n_act) if full else n_act
    B = min(batch_size(forward_bytes(cfg, T, logits=full or loss_seqs > 0, d_sae=d_sae), budget, max_batch), max(end, 1))
    if str(device).startswith("cpu"):  # a batch of more than ~4k tokens runs slower per token on a CPU (caches)
        B = min(B, max(1, CPU_BATCH_TOKENS // T))
    # for the ablation of chosen features: the residual stream where those runs start, kept when it fits
    # (else recomputed for the few sequences needed), and the clean per-token loss at every position
    entries = sorted({entry_hook(sp, L)[0] for sp in saes} - {""}) if ablate else []
    kv = sorted({h for sp in saes for h in (last_block_kv(model, sp, T) or ())}) if entries else []
    kv_width = 2 * (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head if kv else 0
    keep = ablate and full and n_act * T * (cfg.d_model * len(entries) + kv_width) * F32 <= budget // 8
    kept = {e: [] for e in entries + kv} if keep else {}
    for e in kept:
        hooks.append((e, lambda x, hook, e=e: kept[e].append(x.detach().cpu()) if state["lo"] < n_act else None))
    clean_nll = [] if ablate and full else None
    cuts = sorted({0, n_act, end} | ({loss_seqs} if stop is not None else set()))
    batches = [(lo, min(lo + B, b)) for a, b in zip(cuts, cuts[1:]) for lo in range(a, b, B)]
    token_loss, hits, clean = [], 0, [0.0, 0]
    top_ids, top_probs = [], []
    pred_ids, pred_probs = [], []
    with torch.inference_mode():
        for lo, hi in batches:
            state["lo"] = lo
            x = torch.as_tensor(inputs[lo:hi], device=device)
            fw = hooks if hi <= n_act else []
            if stop is not None and lo >= loss_seqs:
                model.run_with_hooks(x, fwd_hooks=fw, stop_at_layer=stop)
            else:
                logits = model.run_with_hooks(x, fwd_hooks=fw) if fw else model(x)
                tg = torch.as_tensor(targets[lo:hi], device=device)
                sc = torch.as_tensor(scored[lo:hi], device=device)
                m = min(max(loss_seqs - lo, 0), len(x))  # rows whose clean loss the SAE's loss is compared with
                if m:
                    ce, _ = loss_terms(logits[:m], tg[:m], sc[:m])
                    clean[0] += ce.double().sum().item()
                    clean[1] += ce.numel()
                if full and lo < n_eval:
                    r = min(hi, n_eval) - lo
                    ce, h = loss_terms(logits[:r], tg[:r], sc[:r])
                    token_loss.append(ce.cpu().numpy())
                    hits += h
                if (clean_nll is not None or n_pred) and lo < n_act:  # log-normaliser once, no [B,T,V] softmax
                    lg = logits[: n_act - lo].float()
                    lse = torch.logsumexp(lg, -1)
                    if clean_nll is not None:
                        clean_nll.append((lse - lg.gather(-1, tg[: n_act - lo].long()[..., None]).squeeze(-1)).cpu())
                    if n_pred:
                        pr = lg.topk(n_pred, dim=-1)
                        pred_ids.append(pr.indices.to(torch.int32).cpu())
                        pred_probs.append((pr.values - lse[..., None]).exp().to(torch.float16).cpu())
                    del lg
                if lo < S and full:
                    pr = logits[: S - lo].float().softmax(-1).topk(k, dim=-1)
                    top_ids.append(pr.indices.cpu())
                    top_probs.append(pr.values.cpu())
                del logits
            if progress:
                progress(hi, end)
    trace.metrics = {"n_seqs": n_eval if full else n_act, "n_act": n_act, "seq_len": T, "batch_size": B}
    if full:
        tl = np.concatenate(token_loss).astype(np.float32) if token_loss else np.zeros(0, np.float32)
        trace.token_loss = tl
        n = int(tl.size)
        trace.metrics.update({"loss": float(tl.astype(np.float64).mean()) if n else float("nan"),
                              "accuracy": hits / max(n, 1), "hits": hits, "n_scored": n})
        trace.arrays["top_ids"] = torch.cat(top_ids).numpy().astype(np.int32)
        trace.arrays["top_probs"] = torch.cat(top_probs).numpy().astype(np.float32)
    if att:
        n = max(n_act * T, 1)
        mean = ent["sum"] / n
        std = (ent["sumsq"] / n - mean ** 2).clamp_min(0).sqrt()
        trace.activations[PATTERN] = {"sample": sample, "pattern": pattern.numpy(), "mean": mean.float().numpy(),
                           "std": std.float().numpy(), "min": ent["min"].numpy(), "max": ent["max"].numpy(),
                           "rows": n_act * T, "per_sequence": seq_ent.astype(np.float32), "seq_len": T}
    if "gradients" in needs:
        gb = min(int(needs["gradients"].get("batch", 8)), N)
        per_seq = backward_bytes(cfg, T)
        room = max(budget - F32 * sum(p.numel() for p in model.parameters()), 1)  # less the parameters' gradients
        recompute = per_seq > room  # not even one sequence's saved activations fit: recompute layer by layer
        micro = batch_size(checkpointed_bytes(cfg, T) if recompute else per_seq, room, max_batch)
        trace.gradients = gradient_norms(model, inputs, targets, scored, gb, device, micro, recompute)
    if "run_from_layer" in needs:
        need = needs["run_from_layer"]
        trace.run_from = run_from_layer(model, need, device, run_from_batch(need, cfg, budget))
    if n_pred:
        trace.token_predictions = {"ids": torch.cat(pred_ids).numpy(), "probs": torch.cat(pred_probs).numpy()}
    if want_sae:
        from .sae import finish

        trace.sae = finish(model, saes, streams, recon, var_seqs * T, sn, inputs[:n_act], targets[:n_act],
                           scored[:loss_seqs], clean, loss_seqs, device, B,
                           kept={e: torch.cat(v) for e, v in kept.items()} if keep else None,
                           clean_nll=torch.cat(clean_nll).numpy() if clean_nll else None)
    return trace


def _logits_recomputed(model, x):
    """Logits whose backward recomputes each block from its input (torch.utils.checkpoint): the memory of a
    backward pass is one layer's activations, not all layers'. The same gradient as a plain forward."""
    from torch.utils.checkpoint import checkpoint

    resid = model(x, stop_at_layer=0)  # embeddings (and positional embeddings) only
    for i in range(model.cfg.n_layers):
        resid = checkpoint(lambda r, i=i: model(r, start_at_layer=i, stop_at_layer=i + 1), resid, use_reentrant=False)
    return model(resid, start_at_layer=model.cfg.n_layers)


def gradient_norms(model, inputs, targets, scored, batch: int, device: str, micro: int | None = None,
                   recompute: bool = False) -> list:
    """L2 norm of each parameter's gradient of the mean loss over the scored positions of the first `batch`
    sequences, accumulated over micro-batches of `micro` sequences (the same gradient, bounded memory);
    `recompute`: each layer recomputed in the backward pass (for sequences whose activations do not fit)."""
    import torch

    micro = micro or batch
    total = int(scored[:batch].sum())
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for lo in range(0, batch, micro):
            hi = min(lo + micro, batch)
            sc = torch.as_tensor(scored[lo:hi], device=device)
            if not sc.any():
                continue
            x = torch.as_tensor(inputs[lo:hi], device=device)
            logits = _logits_recomputed(model, x) if recompute else model(x)
            lg = logits[sc].float()
            t = torch.as_tensor(targets[lo:hi], device=device)[sc]
            loss = (torch.logsumexp(lg, -1) - lg.gather(-1, t[:, None]).squeeze(-1)).sum() / max(total, 1)
            loss.backward()
            del logits, lg, loss
    out = [(name, float(p.grad.norm()) if p.grad is not None else 0.0) for name, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    return out


def run_from_layer(model, need: dict, device: str, batch: int | None = None) -> dict:
    """Top token and its probability for each of `need["count"]` vectors (made by `need["vectors"](rows,
    d_model)`) entering the residual stream before block `need["layer"]`, each as a one-token sequence, in
    batches of `batch` vectors."""
    import torch

    n, layer = int(need["count"]), int(need["layer"])
    B = int(batch or need.get("batch_size", 100))
    ids = np.zeros(n, dtype=np.int32)
    probs = np.zeros(n, dtype=np.float32)
    with torch.inference_mode():
        for lo in range(0, n, B):
            v = need["vectors"](slice(lo, min(lo + B, n)), model.cfg.d_model)
            resid = v.to(device=device, dtype=model.W_U.dtype)[:, None, :]  # [b, 1, D]
            logits = model(resid, start_at_layer=layer)[:, 0]
            p = logits.float().softmax(-1).max(-1)
            ids[lo:lo + len(v)] = p.indices.cpu().numpy()
            probs[lo:lo + len(v)] = p.values.cpu().numpy()
    return {"ids": ids, "probs": probs, "layer": layer, "batch_size": B,
            "vectors": dict(getattr(need["vectors"], "spec", {}))}  # how the vectors were made, when they say


def run_from_batch(need: dict, cfg, budget: int) -> int:
    """Vectors per forward pass: the need's batch_size, or fewer when their logits exceed the budget."""
    return batch_size(forward_bytes(cfg, 1), budget, int(need.get("batch_size", 100)))


def check_run_from_memory(need: dict, cfg, budget: int, what: str) -> None:
    """Refuse more vectors than the available memory holds the outputs of, saying how many fit (the batches
    are sized by the budget, so only the per-vector results grow with the count)."""
    n = int(need["count"])
    per = int(need.get("bytes_per_vector", 16))  # id, probability and what the analysis keeps of each
    total = n * per + run_from_batch(need, cfg, budget) * forward_bytes(cfg, 1)
    avail = _available_bytes()
    if avail and total > avail * 0.5:
        fit = int(avail * 0.5 / per)
        hint = need["fit_hint"](fit) if callable(need.get("fit_hint")) else f"at most {fit:,} vectors fit"
        raise ReportgenError(f"{what}: {n:,} vectors need about {total / 2**30:.1f} GiB but about "
                             f"{avail / 2**30:.1f} GiB is available; {hint}")


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
