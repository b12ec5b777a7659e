"""The language-model probe: one activation pass over the evaluation tokens, shared by every analysis.

Analyses declare what they need (`needs(params)` → dict); the probe merges those needs and runs the
model once over the tokens in batches, with hooks that reduce each hooked activation on the fly
(attention entropy, SAE codes) so memory stays bounded. Only what cannot come from that pass runs
apart: the gradient of one batch's loss, token-map grid vectors (they are not text), and the loss
with the SAE spliced in (the clean pass must not be altered), on a subsample of sequences.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import ReportgenError


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
    metrics: dict = field(default_factory=dict)  # loss, accuracy, n_scored
    arrays: dict = field(default_factory=dict)  # top_ids, top_probs, ... (saved to data/trace.npz)
    attention: dict | None = None
    gradients: list | None = None  # (parameter name, grad norm)
    token_map: dict | None = None
    sae: dict | None = None

    def save(self, path) -> None:
        np.savez_compressed(path, tokens=self.tokens.astype(np.int32), inputs=self.inputs.astype(np.int32),
                            scored=self.scored, targets=self.targets.astype(np.int32),
                            **{k: v for k, v in self.arrays.items()})


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


def layer_of(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


def loss_terms(logits, targets, scored):
    """Sum of cross-entropy and of top-1 hits at the scored positions, and their count."""
    lp = logits[scored].float().log_softmax(-1)
    t = targets[scored]
    ce = -lp.gather(-1, t[:, None]).squeeze(-1)
    return ce.sum().item(), (lp.argmax(-1) == t).sum().item(), int(t.numel())


def probe_lm(subject, tokens: np.ndarray, inputs: np.ndarray, scored: np.ndarray, needs: dict, device: str,
             batch_size: int = 32, samples: int = 5, sae=None, progress=None) -> LMTrace:
    import torch

    model = subject.model
    cfg = model.cfg
    N, T = tokens.shape
    if subject.causal:
        targets = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    else:
        targets = tokens
    trace = LMTrace(tokens=tokens, inputs=inputs, scored=scored, targets=targets, vocab=subject.vocab,
                    causal=subject.causal, mask_id=subject.mask_id, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    k = int(needs.get("predictions", {}).get("top_k", 5))
    S = min(samples, N)
    att = needs.get("attention")
    sample = min(int(att.get("sample", 0)), N - 1) if att else 0
    L, H = cfg.n_layers, cfg.n_heads
    ent = {"sum": torch.zeros(L, H, dtype=torch.float64), "sumsq": torch.zeros(L, H, dtype=torch.float64),
           "min": torch.full((L, H), float("inf")), "max": torch.full((L, H), float("-inf")), "n": 0}
    pattern = torch.zeros(L, H, T, T)
    want_sae = sae is not None and "sae" in needs
    hook = sae.cfg.metadata.hook_name if want_sae else None
    sae_rows, sae_cols, sae_vals, err_sq = [], [], [], 0.0
    loss_seqs = min(int(needs.get("sae", {}).get("loss_seqs", 8)), N) if want_sae else 0
    kept_acts = []  # hook activations of the first loss_seqs sequences, for the spliced-in loss
    x_sum = x_sq = None
    state = {"lo": 0}
    var_seqs = min(int(needs.get("sae", {}).get("variance_seqs", 64)), N) if want_sae else 0

    def on_pattern(p, hook):  # [B,H,q,k]
        li = layer_of(hook.name)
        e = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [B,H,q]
        ent["sum"][li] += e.sum((0, 2)).double().cpu()
        ent["sumsq"][li] += (e.double() ** 2).sum((0, 2)).cpu()
        ent["min"][li] = torch.minimum(ent["min"][li], e.amin((0, 2)).cpu())
        ent["max"][li] = torch.maximum(ent["max"][li], e.amax((0, 2)).cpu())
        if li == 0:
            ent["n"] += e.shape[0] * e.shape[2]
        lo = state["lo"]
        if lo <= sample < lo + p.shape[0]:
            pattern[li] = p[sample - lo].float().cpu()

    def on_sae(x, hook):  # [B,T,d_in]
        nonlocal err_sq, x_sum, x_sq
        flat = x.reshape(-1, x.shape[-1]).float()
        f = sae.encode(flat)
        nz = f.nonzero()
        v = f[nz[:, 0], nz[:, 1]]
        lo = state["lo"]
        if lo < var_seqs:  # reconstruction error on the first var_seqs sequences (a dense decode costs an encode)
            m = min(var_seqs - lo, x.shape[0]) * T
            sub = flat[:m]
            err_sq += (sae.decode(f[:m]) - sub).pow(2).sum().item()
            x_sum = sub.sum(0) if x_sum is None else x_sum + sub.sum(0)
            x_sq = sub.pow(2).sum(0) if x_sq is None else x_sq + sub.pow(2).sum(0)
        base = state["lo"] * T
        sae_rows.append((nz[:, 0] + base).cpu())
        sae_cols.append(nz[:, 1].cpu())
        sae_vals.append(v.float().cpu())
        if lo < loss_seqs:
            kept_acts.append(x[: loss_seqs - lo].clone())

    hooks = []
    if att:
        hooks += [(f"blocks.{i}.attn.hook_pattern", on_pattern) for i in range(L)]
    if want_sae:
        hooks.append((hook, on_sae))
    ce_sum = hits = count = 0
    clean = [0.0, 0]
    top_ids, top_probs = [], []
    # Logits over every sequence only when an analysis reads them; an SAE alone stops after its hook layer
    # (the sequences of its clean / spliced loss still run whole).
    full = bool(att) or "predictions" in needs or not want_sae or layer_of(hook) is None
    stop = None if full else layer_of(hook) + 1
    starts = list(range(0, N, batch_size))
    if stop is not None and 0 < loss_seqs < batch_size:  # the loss sequences apart, as a batch of their own
        starts = [0] + list(range(loss_seqs, N, batch_size))
    ends = starts[1:] + [N]
    with torch.inference_mode():
        for lo, hi in zip(starts, ends):
            state["lo"] = lo
            x = torch.as_tensor(inputs[lo:hi], device=device)
            if stop is not None and lo >= loss_seqs:
                model.run_with_hooks(x, fwd_hooks=hooks, stop_at_layer=stop)
            else:
                logits = model.run_with_hooks(x, fwd_hooks=hooks) if hooks else model(x)
                tg = torch.as_tensor(targets[lo:hi], device=device)
                sc = torch.as_tensor(scored[lo:hi], device=device)
                m = min(max(loss_seqs - lo, 0), len(x))  # rows whose clean loss the SAE's loss is compared with
                for part in (slice(0, m), slice(m, None)):
                    c, h, n = loss_terms(logits[part], tg[part], sc[part])
                    ce_sum, hits, count = ce_sum + c, hits + h, count + n
                    if part.start == 0 and m:
                        clean[0] += c
                        clean[1] += n
                if lo < S and full:
                    pr = logits[: S - lo].float().softmax(-1).topk(k, dim=-1)
                    top_ids.append(pr.indices.cpu())
                    top_probs.append(pr.values.cpu())
            if progress:
                progress(hi, N)
    trace.metrics = {"loss": ce_sum / max(count, 1), "accuracy": hits / max(count, 1), "n_scored": count,
                     "n_seqs": N, "seq_len": T} if full else {"n_seqs": N, "seq_len": T}
    if full:
        trace.arrays["top_ids"] = torch.cat(top_ids).numpy().astype(np.int32)
        trace.arrays["top_probs"] = torch.cat(top_probs).numpy().astype(np.float32)
    if att:
        n = max(ent["n"], 1)
        mean = ent["sum"] / n
        std = (ent["sumsq"] / n - mean ** 2).clamp_min(0).sqrt()
        trace.attention = {"sample": sample, "pattern": pattern.numpy(), "mean": mean.float().numpy(),
                           "std": std.float().numpy(), "min": ent["min"].numpy(), "max": ent["max"].numpy(),
                           "rows": ent["n"]}
    if "gradients" in needs:
        trace.gradients = gradient_norms(model, inputs, targets, scored, int(needs["gradients"].get("batch", 8)), device)
    if "token_map" in needs:
        trace.token_map = token_map(model, needs["token_map"], device)
    if want_sae:
        trace.sae = sae_summary(model, sae, hook, N * T, torch.cat(sae_rows), torch.cat(sae_cols), torch.cat(sae_vals),
                                err_sq, x_sum, x_sq, var_seqs * T, kept_acts, inputs[:loss_seqs], targets[:loss_seqs],
                                scored[:loss_seqs], clean, device)
    return trace


def gradient_norms(model, inputs, targets, scored, batch: int, device: str) -> list:
    """L2 norm of each parameter's gradient of the loss on the first `batch` sequences."""
    import torch

    x = torch.as_tensor(inputs[:batch], device=device)
    tg = torch.as_tensor(targets[:batch], device=device)
    sc = torch.as_tensor(scored[:batch], device=device)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model(x)
        lp = logits[sc].float().log_softmax(-1)
        loss = -lp.gather(-1, tg[sc][:, None]).mean()
        loss.backward()
    out = [(name, float(p.grad.norm()) if p.grad is not None else 0.0) for name, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    return out


def grid_vectors(spec: dict, d_model: int, rows: slice | None = None):
    """2-D grid coordinates [G*G, 2] (row-major, y from top) and their d_model-dimensional vectors."""
    import torch

    G, s = int(spec["grid_size"]), float(spec["spacing"])
    cx, cy = (float(c) for c in spec.get("center", (0.0, 0.0)))
    axis = (np.arange(G) - (G - 1) / 2) * s
    xs, ys = np.meshgrid(cx + axis, cy - axis)  # row 0 at the top: largest y
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    if rows is not None:
        coords = coords[rows]
    c = torch.from_numpy(coords)
    method = spec["method"]
    if method == "direct":
        v = torch.zeros(len(c), d_model)
        v[:, :2] = c
    elif method == "replicated":
        v = c.repeat(1, (d_model + 1) // 2)[:, :d_model]
    elif method == "random_projection":
        g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
        R = torch.randn(2, d_model, generator=g) / np.sqrt(d_model)  # E|cR|^2 = |c|^2: distances kept on average
        v = c @ R
    else:
        raise ValueError(f"unknown embedding method {method!r}")
    return coords, v


def token_map(model, spec: dict, device: str) -> dict:
    """Top token and its probability for every grid vector entering the residual stream at `layer`."""
    import torch

    G, B, layer = int(spec["grid_size"]), int(spec["batch_size"]), int(spec["layer"])
    n = G * G
    ids = np.zeros(n, dtype=np.int32)
    probs = np.zeros(n, dtype=np.float32)
    with torch.inference_mode():
        for lo in range(0, n, B):
            _, v = grid_vectors(spec, model.cfg.d_model, slice(lo, lo + B))
            resid = v.to(device)[:, None, :]  # [b, 1, D]: each vector is a one-token sequence
            logits = model(resid, start_at_layer=layer)[:, 0]
            p = logits.float().softmax(-1).max(-1)
            ids[lo:lo + B] = p.indices.cpu().numpy()
            probs[lo:lo + B] = p.values.cpu().numpy()
    coords, _ = grid_vectors({**spec, "method": "direct"}, 2)
    return {"coords": coords, "ids": ids.reshape(G, G), "probs": probs.reshape(G, G), "spec": dict(spec)}


def sae_summary(model, sae, hook: str, n_tokens: int, rows, cols, vals, err_sq, x_sum, x_sq, var_tokens, kept_acts,
                inputs, targets, scored, clean, device) -> dict:
    """Sparse codes over all tokens, reconstruction quality and the spliced-in / zero-ablated loss."""
    import torch

    d_sae = int(sae.cfg.d_sae)
    var = (x_sq - x_sum ** 2 / var_tokens).sum().item()
    explained = 1.0 - err_sq / var if var > 0 else float("nan")
    losses = {}
    if len(inputs) and clean[1]:
        losses["clean"] = clean[0] / clean[1]
        x = torch.as_tensor(inputs, device=device)
        tg = torch.as_tensor(targets, device=device)
        sc = torch.as_tensor(scored, device=device)
        acts = torch.cat(kept_acts)
        li = layer_of(hook)
        with torch.inference_mode():
            recon = sae.decode(sae.encode(acts.reshape(-1, acts.shape[-1]).float())).reshape(acts.shape)
            for name, repl in (("sae", recon), ("zero", torch.zeros_like(acts))):
                if hook.endswith("hook_resid_post") and li is not None:
                    logits = model(repl.to(acts.dtype), start_at_layer=li + 1)
                elif hook.endswith("hook_resid_pre") and li is not None:
                    logits = model(repl.to(acts.dtype), start_at_layer=li)
                else:
                    logits = model.run_with_hooks(x, fwd_hooks=[(hook, lambda a, hook, r=repl: r.to(a.dtype))])
                c, _, n = loss_terms(logits, tg, sc)
                losses[name] = c / max(n, 1)
    W_dec = sae.W_dec.detach().float()
    effects = (W_dec @ model.W_U.detach().float())  # [d_sae, V] direct logit effect
    kk = min(10, effects.shape[1])
    pos, neg = effects.topk(kk, dim=1), (-effects).topk(kk, dim=1)
    return {"hook": hook, "d_sae": d_sae, "d_in": int(sae.cfg.d_in), "n_tokens": n_tokens,
            "rows": rows.numpy().astype(np.int64), "cols": cols.numpy().astype(np.int32),
            "vals": vals.numpy().astype(np.float32), "explained_variance": explained, "variance_tokens": int(var_tokens), "losses": losses,
            "loss_seqs": int(len(inputs)), "logit_pos_ids": pos.indices.numpy(), "logit_pos": pos.values.numpy(),
            "logit_neg_ids": neg.indices.numpy(), "logit_neg": -neg.values.numpy()}


def check_token_map_memory(spec: dict, d_model: int, d_vocab: int) -> None:
    """Refuse a grid whose outputs or batches do not fit in the available memory, saying what fits."""
    G, B = int(spec["grid_size"]), int(spec["batch_size"])
    per_cell = 4 + 4 + 8 + 60  # id, prob, coordinates, and its label in the figure
    per_batch_row = 4 * (3 * d_vocab + 16 * d_model)  # logits + softmax, activations in flight
    need = G * G * per_cell + B * per_batch_row
    avail = _available_bytes()
    if avail and need > avail * 0.5:
        fit_g = int(((avail * 0.5 - B * per_batch_row) / per_cell) ** 0.5) if avail * 0.5 > B * per_batch_row else 0
        fit_b = int((avail * 0.5 - G * G * per_cell) / per_batch_row) if avail * 0.5 > G * G * per_cell else 0
        raise ReportgenError(
            f"token_map: a {G}x{G} grid at batch_size {B} needs about {need / 2**30:.1f} GiB but about "
            f"{avail / 2**30:.1f} GiB is available; at most grid_size {fit_g} fits at this batch_size"
            + (f" (or batch_size {fit_b} at this grid_size)" if fit_b else ""))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
