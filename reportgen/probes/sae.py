"""The SAE part of the language-model probe: one or more SAELens SAEs (or transcoders) read while the model runs.

`Spliced` wraps one SAE: where it reads (`metadata.hook_name`), where its reconstruction belongs
(`metadata.hook_name_out` for a transcoder, else the same hook), and SAELens's own `encode` / `decode` on
flattened activations (`hook_z` SAEs see the heads concatenated, as SAELens reshapes them).

`FeatureStream` keeps per-feature statistics of the codes batch by batch in memory that does not grow with
the number of tokens: counts, sums and maxima; a log-binned activation histogram (48 bins a decade over
1e-5..1e5); the top-k activations and a uniform sample of every feature's firings (bottom-k random keys, a
reservoir), each with the feature's activations on the tokens around it; the per-token L0; and the sparse
codes of a bounded prefix of tokens for co-occurrence. What the page shows comes from these.

After the pass, `finish` adds what needs the model again on a few sequences: the loss with the SAE spliced
in and zero-ablated, the loss change of ablating each chosen feature on its top contexts, the prompts'
token × feature view, and what comes from the weights alone: logit tables through the unembedding and
nearest features by decoder cosine similarity.
"""
from __future__ import annotations

import math

import numpy as np

LOG_LO, LOG_HI, PER_DECADE = -5, 5, 48
N_BINS = (LOG_HI - LOG_LO) * PER_DECADE
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def bin_edges() -> np.ndarray:
    """Activation values at the edges of the histogram's log bins (the first and last bins also hold what
    lies beyond them)."""
    return 10.0 ** (LOG_LO + np.arange(N_BINS + 1) / PER_DECADE)


class Spliced:
    """One SAE as the probe uses it."""

    def __init__(self, sae, name: str = ""):
        c = sae.cfg
        self.sae, self.name = sae, name
        self.arch = c.architecture()
        self.hook = c.metadata.hook_name
        self.transcoder = self.arch in TRANSCODERS or hasattr(sae, "d_out")
        self.out_hook = (c.metadata.hook_name_out or self.hook) if self.transcoder else self.hook
        self.head = c.metadata.hook_head_index
        self.d_sae, self.d_in = int(c.d_sae), int(c.d_in)
        if getattr(sae, "hook_z_reshaping_mode", False):  # we flatten [.., heads, d_head] ourselves
            sae.turn_off_forward_pass_hook_z_reshaping()
        act = getattr(sae, "activation_fn", None)  # SAELens's TopK can give its codes as the top-k pairs alone
        self._topk = act if (type(act).__name__, type(act).__module__) == ("TopK", "sae_lens.saes.topk_sae") and \
            hasattr(act, "use_sparse_activations") else None

    def flat(self, x):
        """[B,T,...] activations at a hook -> [B*T, width] (one head of hook_z when the SAE reads one)."""
        if self.head is not None and x.ndim == 4:
            x = x[:, :, int(self.head)]
        return x.reshape(x.shape[0] * x.shape[1], -1)

    def encode(self, flat):
        return self.sae.encode(flat.to(self.sae.dtype))

    def decode(self, f):
        return self.sae.decode(f)

    def codes(self, flat) -> "Codes":
        """SAELens's encode of flattened activations as `Codes`. A TopK SAE's TopK activation is asked for its
        sparse output (its `use_sparse_activations`): the same values, without the dense [n, d_sae] codes and
        the scan for their non-zero entries (at 16k features, 67M entries a batch)."""
        act = self._topk
        if act is None or act.use_sparse_activations:
            return Codes.of(self.encode(flat))
        act.use_sparse_activations = True
        try:
            return Codes.of(self.encode(flat))
        finally:
            act.use_sparse_activations = False

    def replace(self, x, new_flat):
        """x with the SAE's part (all of it, or its head) replaced by `new_flat` [B*T, width]."""
        B, T = x.shape[:2]
        if self.head is not None and x.ndim == 4:
            out = x.clone()
            out[:, :, int(self.head)] = new_flat.reshape(B, T, -1).to(x.dtype)
            return out
        return new_flat.reshape(x.shape).to(x.dtype)

    def decoder_rows(self, ids):
        return self.sae.W_dec.detach()[ids].float()


class Codes:
    """One batch of an SAE's codes [n, d] as its non-zero entries: token `rows`, feature `cols` and activations
    `vals` (float32), in token then feature order; the dense codes where the SAE gave them, else made on demand."""

    SEARCH_COST = 64  # a binary search among the entries costs about as much as writing this many dense entries

    def __init__(self, rows, cols, vals, n: int, d: int, dense=None, dtype=None):
        self.rows, self.cols, self.vals, self.n, self.d, self._dense = rows, cols, vals, n, d, dense
        self.dtype = dtype or vals.dtype  # the SAE's: what `dense` gives back
        self._key = None

    @classmethod
    def of(cls, f) -> "Codes":
        n, d = f.shape
        if f.is_sparse:
            f = f.coalesce()  # sorted by (token, feature); a TopK gives each pair once
            (r, c), v = f.indices(), f.values()
            keep = v != 0  # the TopK keeps its k largest pre-activations, ReLU'd: some may be 0
            return cls(r[keep], c[keep], v[keep].float(), n, d, dtype=v.dtype)
        r, c = f.nonzero(as_tuple=True)
        return cls(r, c, f[r, c].float(), n, d, dense=f)

    def at(self, rows, cols):
        """The activations at (token, feature) index tensors of one shape (0 where the code is 0): found among the
        sorted entries (SEARCH_COST), or read from the dense codes, made for this where that is cheaper."""
        import torch

        if self._dense is None and rows.numel() * self.SEARCH_COST >= self.n * self.d:
            self._dense = self.dense()
        if self._dense is not None:
            return self._dense[rows, cols].float()
        if self._key is None:
            self._key = self.rows * self.d + self.cols  # ascending
        q = (rows * self.d + cols).reshape(-1)
        if not len(self._key):
            return torch.zeros(rows.shape, device=q.device)
        i = torch.searchsorted(self._key, q).clamp_max(len(self._key) - 1)
        return torch.where(self._key[i] == q, self.vals[i], torch.zeros_like(self.vals[i])).reshape(rows.shape)

    def dense(self, m: int | None = None):
        """The dense codes of the first m tokens (all by default) [m, d]."""
        import torch

        m = self.n if m is None else min(m, self.n)
        if self._dense is not None:
            return self._dense[:m]
        out = torch.zeros((m, self.d), dtype=self.dtype, device=self.vals.device)
        k = self.rows < m
        out[self.rows[k], self.cols[k]] = self.vals[k].to(self.dtype)
        return out


class _Best:
    """For each of d features, the K entries of highest score seen so far (ties: the earlier token), with the
    entry's token index, activation and the feature's activations on the 2c+1 tokens around it (NaN beyond the
    sequence). Rows stay sorted best first."""

    def __init__(self, d: int, K: int, c: int, device):
        import torch

        self.K, self.c = K, c
        self.score = torch.full((d, K), -math.inf, device=device)
        self.tok = torch.full((d, K), -1, dtype=torch.int64, device=device)
        self.val = torch.zeros((d, K), device=device)
        self.win = torch.full((d, K, 2 * c + 1), math.nan, dtype=torch.float16, device=device)

    def offer(self, cols, score, tok, val, codes: Codes, base: int, T: int, unit: bool = False):
        """Entries (feature, score, token, activation) in token order, of the batch `codes`; `unit`: scores in
        (-1, 0] (the sample's random keys), sorted by feature and score at once."""
        import torch

        idx = (score > self.score[cols, -1]).nonzero().squeeze(1)
        if not len(idx):
            return
        c = cols[idx]
        if unit and self.score.shape[0] < 1 << 29:  # feature + key in float64 is exact: one stable sort
            o = torch.argsort(c.double() - score[idx].double(), stable=True)
        else:  # best first, ties to the earlier token, then grouped by feature
            o = torch.argsort(score[idx], descending=True, stable=True)
            o = o[torch.argsort(c[o], stable=True)]
        idx, c = idx[o], c[o]
        feats, inv, cnt = torch.unique_consecutive(c, return_inverse=True, return_counts=True)
        start = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(len(c), device=c.device) - start[inv]
        k = rank < self.K
        idx, inv, rank = idx[k], inv[k], rank[k]
        cols, score, tok, val = cols[idx], score[idx], tok[idx], val[idx]
        m = len(feats)
        cs = torch.full((m, self.K), -math.inf, device=score.device)
        ct = torch.full((m, self.K), -1, dtype=torch.int64, device=score.device)
        cv = torch.zeros((m, self.K), device=score.device)
        cw = torch.full((m, self.K, 2 * self.c + 1), math.nan, dtype=torch.float16, device=score.device)
        cs[inv, rank], ct[inv, rank], cv[inv, rank] = score, tok, val
        local = tok - base
        seq, pos = local // T, local % T
        q = pos[:, None] + torch.arange(-self.c, self.c + 1, device=pos.device)
        inside = (q >= 0) & (q < T)
        w = codes.at((seq * T)[:, None] + q.clamp(0, T - 1), cols[:, None].expand(-1, q.shape[1]))
        cw[inv, rank] = torch.where(inside, w, torch.full_like(w, math.nan)).to(torch.float16)
        S = torch.cat([self.score[feats], cs], 1)
        order = torch.argsort(S, dim=1, descending=True, stable=True)[:, :self.K]
        self.score[feats] = S.gather(1, order)
        self.tok[feats] = torch.cat([self.tok[feats], ct], 1).gather(1, order)
        self.val[feats] = torch.cat([self.val[feats], cv], 1).gather(1, order)
        W = torch.cat([self.win[feats], cw], 1)
        self.win[feats] = W.gather(1, order[:, :, None].expand(-1, -1, W.shape[2]))


class FeatureStream:
    """Streaming statistics of one SAE's codes (see the module docstring)."""

    def __init__(self, d: int, T: int, top_k: int, reservoir: int, context: int, cooc_tokens: int, device,
                 seed: int = 0):
        import torch

        self.d, self.T, self.cooc_tokens = d, T, cooc_tokens
        self.count = torch.zeros(d, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.max = torch.zeros(d, device=device)
        self.hist = torch.zeros(d * N_BINS, dtype=torch.int32, device=device)
        self.top = _Best(d, top_k, context, device)
        self.sample = _Best(d, reservoir, context, device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.n_tokens, self.l0_sum, self.l0_sq = 0, 0.0, 0.0
        self.cooc = []  # (token, feature) int32 pairs of the first cooc_tokens tokens

    def update(self, codes, base: int) -> None:
        """Codes (a `Codes`, or dense [n, d]) of tokens base .. base+n-1 (whole sequences of T tokens)."""
        import torch

        if not isinstance(codes, Codes):
            codes = Codes.of(codes)
        rows, cols, val, n = codes.rows, codes.cols, codes.vals, codes.n
        self.n_tokens += n
        per = torch.bincount(rows, minlength=n).double()
        self.l0_sum += float(per.sum())
        self.l0_sq += float((per * per).sum())
        self.count += torch.bincount(cols, minlength=self.d)
        self.sum.index_add_(0, cols, val.double())
        self.max.scatter_reduce_(0, cols, val, "amax")
        b = ((torch.log10(val.abs().clamp_min(1e-30)) - LOG_LO) * PER_DECADE).floor().clamp_(0, N_BINS - 1).long()
        self.hist.index_add_(0, cols * N_BINS + b, torch.ones_like(b, dtype=torch.int32))
        tok = rows + base
        self.top.offer(cols, val, tok, val, codes, base, self.T)
        key = torch.rand(len(val), generator=self.gen, device=val.device)
        self.sample.offer(cols, -key, tok, val, codes, base, self.T, unit=True)
        if base < self.cooc_tokens:
            m = tok < self.cooc_tokens
            self.cooc.append(torch.stack([tok[m], cols[m]], 1).to(torch.int32).cpu())

    def result(self) -> dict:
        import torch

        n = max(self.n_tokens, 1)
        mean = self.l0_sum / n
        var = (self.l0_sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
        cooc = torch.cat(self.cooc).numpy() if self.cooc else np.zeros((0, 2), np.int32)
        out = {"n_tokens": self.n_tokens, "l0": mean, "l0_std": math.sqrt(max(var, 0.0)),
               "count": self.count.cpu().numpy(), "sum": self.sum.cpu().numpy(), "max": self.max.cpu().numpy(),
               "hist": self.hist.reshape(self.d, N_BINS).cpu().numpy(), "cooc": cooc,
               "cooc_tokens": min(self.cooc_tokens, self.n_tokens)}
        for name, best in (("top", self.top), ("sample", self.sample)):
            out[f"{name}_tok"] = best.tok.cpu().numpy()
            out[f"{name}_val"] = best.val.cpu().numpy()
            out[f"{name}_win"] = best.win.float().cpu().numpy()
        return out


def logit_tables(model, sp: Spliced, k: int = 10, chunk: int = 1024) -> dict:
    """Top / bottom k tokens of each feature's decoder direction read through the unembedding, and how: the
    direction in the residual stream (hook_z through the layer's W_O), then the final norm where it can be
    folded (centring for LayerNorm, its weights for LN/RMS), then W_U. Chunked over features (d_sae x d_vocab
    need not fit)."""
    import torch

    from .common import layer_of

    cfg = model.cfg
    W_U = model.W_U.detach().float()
    how = []
    li = layer_of(sp.out_hook)
    W_O = None
    if sp.out_hook.endswith("hook_z") and li is not None:
        W_O = model.blocks[li].attn.W_O.detach().float()  # [H, d_head, d_model]
        how.append(f"through blocks.{li}.attn.W_O")
    norm = cfg.normalization_type
    center = norm in ("LN", "LNPre")
    scale = None
    if norm in ("LN", "RMS") and hasattr(model, "ln_final") and hasattr(model.ln_final, "w"):
        scale = model.ln_final.w.detach().float()
        how.append("through the final norm's " + ("centring and weights" if center else "weights"))
    elif norm in ("LNPre", "RMSPre"):
        how.append("through the final norm" + (" (centring; its weights are folded into W_U)" if center else
                                               " (its weights are folded into W_U)"))
    else:
        how.append("straight into W_U (the model has no final norm)")
    how.append("ignoring later layers and the norm's per-token scale")
    d = sp.d_sae
    kk = min(k, W_U.shape[1])
    pos_i = np.zeros((d, kk), np.int64)
    pos_v = np.zeros((d, kk), np.float32)
    neg_i, neg_v = pos_i.copy(), pos_v.copy()
    with torch.inference_mode():
        for lo in range(0, d, chunk):
            D = sp.decoder_rows(slice(lo, min(lo + chunk, d)))
            if W_O is not None:
                H = W_O.shape[0]
                D = torch.einsum("fhe,hem->fm", D.reshape(D.shape[0], H, -1), W_O) if sp.head is None else \
                    D @ W_O[int(sp.head)]
            if center:
                D = D - D.mean(-1, keepdim=True)
            if scale is not None:
                D = D * scale
            E = D.to(W_U.device) @ W_U
            p, q = E.topk(kk, dim=1), (-E).topk(kk, dim=1)
            pos_i[lo:lo + len(E)], pos_v[lo:lo + len(E)] = p.indices.cpu().numpy(), p.values.cpu().numpy()
            neg_i[lo:lo + len(E)], neg_v[lo:lo + len(E)] = q.indices.cpu().numpy(), -q.values.cpu().numpy()
    return {"logit_pos_ids": pos_i, "logit_pos": pos_v, "logit_neg_ids": neg_i, "logit_neg": neg_v,
            "logit_how": ", ".join(how)}


def neighbours(sp: Spliced, k: int = 6, chunk: int = 2048) -> dict:
    """Each feature's k nearest other features by cosine similarity of decoder directions (chunked)."""
    import torch

    W = sp.decoder_rows(slice(None))
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = W.shape[0]
    kk = min(k, d - 1)
    ids = np.zeros((d, max(kk, 0)), np.int64)
    cos = np.zeros((d, max(kk, 0)), np.float32)
    if kk <= 0:
        return {"near_ids": ids, "near_cos": cos}
    with torch.inference_mode():
        for lo in range(0, d, chunk):
            C = W[lo:lo + chunk] @ W.T
            C[torch.arange(len(C)), torch.arange(lo, lo + len(C))] = -math.inf
            t = C.topk(kk, dim=1)
            ids[lo:lo + len(C)], cos[lo:lo + len(C)] = t.indices.cpu().numpy(), t.values.cpu().numpy()
    return {"near_ids": ids, "near_cos": cos}


def head_shares(sp: Spliced, model) -> np.ndarray | None:
    """For an SAE on all heads of hook_z: each feature's share of its decoder norm² per head [d_sae, H]."""
    if not sp.out_hook.endswith("hook_z") or sp.head is not None:
        return None
    H = model.cfg.n_heads
    W = sp.decoder_rows(slice(None))
    if W.shape[1] % H:
        return None
    sq = W.reshape(W.shape[0], H, -1).pow(2).sum(-1)
    return (sq / sq.sum(1, keepdim=True).clamp_min(1e-30)).cpu().numpy().astype(np.float32)


def spliced_losses(model, sp: Spliced, inputs, targets, scored, device: str, batch: int, kept=None) -> dict:
    """Summed CE over the scored positions with the SAE's reconstruction, and zeros, in place of its output hook.
    An SAE that writes to the residual stream (hook_resid_pre / hook_resid_post) is run from `kept`, that
    stream as the probe kept it [N, T, d] (N >= len(inputs)), when there is one: the same runs without the
    blocks before it. A transcoder always runs from the tokens (it encodes another hook)."""
    import torch

    from .common import loss_terms

    entry, start = entry_hook(sp, model.cfg.n_layers)
    direct = (kept is not None and bool(entry) and not sp.transcoder  # a transcoder reads another hook
              and sp.out_hook.endswith(("hook_resid_pre", "hook_resid_post")))
    sums = {"sae": 0.0, "zero": 0.0}
    with torch.inference_mode():
        for lo in range(0, len(inputs), batch):
            tg = torch.as_tensor(targets[lo:lo + batch], device=device)
            sc = torch.as_tensor(scored[lo:lo + batch], device=device)
            if direct:
                r = kept[lo:lo + len(tg)].to(device)
            else:
                x = torch.as_tensor(inputs[lo:lo + batch], device=device)
            for name in sums:
                if direct:  # the output hook's replacement, applied to the stream the probe kept there
                    logits = model(_splice_hooks(sp, name)[-1][1](r, None), start_at_layer=start)
                else:
                    logits = model.run_with_hooks(x, fwd_hooks=_splice_hooks(sp, name))
                ce, _ = loss_terms(logits, tg, sc)
                sums[name] += ce.double().sum().item()
                del logits
    return sums


def _splice_hooks(sp: Spliced, mode: str):
    """Hooks that put the SAE into the model at its output hook: mode "sae" (its reconstruction, encoded from
    its input hook) or "zero" (zeros)."""
    import torch

    held = {}

    def read(x, hook):
        held["f"] = sp.encode(sp.flat(x))

    def write(x, hook):
        if mode == "zero":
            return torch.zeros_like(x)
        f = held["f"] if sp.transcoder else sp.encode(sp.flat(x))
        return sp.replace(x, sp.decode(f))

    return ([(sp.hook, read)] if sp.transcoder else []) + [(sp.out_hook, write)]


def entry_hook(sp: Spliced, n_layers: int) -> tuple[str, int]:
    """(hook, layer): the residual stream from which a run with the SAE's output hook changed starts — the
    output hook itself for hook_resid_pre / hook_resid_post, else the input of the block holding it."""
    from .common import layer_of

    li = layer_of(sp.out_hook)
    if li is None:
        return "", 0
    start = li + 1 if sp.out_hook.endswith("hook_resid_post") else li
    return (f"blocks.{start}.hook_resid_pre" if start < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"), start


def last_block_kv(model, sp: Spliced, T: int) -> tuple[str, str] | None:
    """The hooks of the last block's keys (rotated, where rotary) and values, when the ablation of this SAE's
    features starts at that block's input and computes it for the window alone (`_last_block_at`): the probe
    keeps them, and the ablation recomputes keys and values only at the window's positions (the stream differs
    nowhere else). None where that does not apply."""
    L = model.cfg.n_layers
    entry, start = entry_hook(sp, L)
    if not entry or start != L - 1 or not sp.out_hook.endswith(("hook_resid_pre", "hook_resid_post")):
        return None
    if not _window_block_ok(model, T):
        return None
    a = f"blocks.{L - 1}.attn."
    return (a + ("hook_rot_k" if model.cfg.positional_embedding_type == "rotary" else "hook_k"), a + "hook_v")


def ablation_effects(model, sp: Spliced, pairs: list, inputs, targets, device: str, batch: int, kept=None,
                     clean_nll=None, kv=None) -> list:
    """For (feature, token index, window activations) triples, the change of the per-token loss (the target's
    negative log-probability, at every position of the window) when the feature is ablated on that context:
    the activations of its 2c+1 tokens less the feature's activation times its decoder row (the SAE's error
    kept). The runs start from the residual stream before the first block the change reaches, `kept` [N,T,d]
    when the probe kept it, else recomputed; `clean_nll` [N,T] likewise; `kv`: the last block's clean keys
    and values [N,T,heads,d_head] at the hooks `last_block_kv` names (given only where it names them), when
    the probe kept them."""
    import torch

    T = inputs.shape[1]
    entry, start = entry_hook(sp, model.cfg.n_layers)
    direct = sp.out_hook.endswith(("hook_resid_pre", "hook_resid_post"))
    out = []
    with torch.inference_mode():
        for lo in range(0, len(pairs), batch):
            chunk = pairs[lo:lo + batch]
            s = [int(t) // T for _, t, _ in chunk]
            W = np.stack([w for _, _, w in chunk])  # [B, 2c+1]
            c = (W.shape[1] - 1) // 2
            p = np.array([int(t) % T for _, t, _ in chunk])
            q = p[:, None] + np.arange(-c, c + 1)
            ok = (q >= 0) & (q < T)
            qc = torch.as_tensor(np.clip(q, 0, T - 1), device=device)
            tg = torch.as_tensor(targets[s], device=device).long().gather(1, qc)  # [B, 2c+1]
            js = torch.as_tensor([int(j) for j, _, _ in chunk], device=device)
            dec = sp.decoder_rows(js).to(device)  # [B, d]
            if kv is not None and kept is not None and clean_nll is not None:  # the last block at the window alone
                aw = torch.as_tensor(np.where(ok, np.nan_to_num(W), 0), dtype=torch.float32, device=device)
                si = torch.as_tensor(s)[:, None]
                xq = kept[si, qc.cpu()].to(device)  # the block's input at the window [B, 2c+1, d]
                xq = xq - (aw[:, :, None] * dec[:, None, :]).to(xq.dtype)
                clean = np.take_along_axis(np.asarray(clean_nll[s]), qc.cpu().numpy(), 1)
                final = _last_block_at(model.blocks[model.cfg.n_layers - 1], xq, qc,
                                       (kv[0][s].to(device), kv[1][s].to(device), torch.as_tensor(ok, device=device)))
                d = _window_nll(model, final, tg).cpu().numpy() - clean
                out += [np.where(k, e, np.nan).astype(np.float32) for k, e in zip(ok, d)]
                continue
            if kept is not None:
                resid = kept[s].to(device)
            else:
                x = torch.as_tensor(inputs[s], device=device)
                resid = model(x, stop_at_layer=start) if entry else x
            if clean_nll is not None:
                clean = np.take_along_axis(np.asarray(clean_nll[s]), qc.cpu().numpy(), 1)
            else:
                clean = _window_nll(model, _from(model, resid, start, entry, qc), tg).cpu().numpy()
            a = np.zeros((len(chunk), T), np.float32)
            rows = np.broadcast_to(np.arange(len(chunk))[:, None], q.shape)
            a[rows[ok], q[ok]] = np.nan_to_num(W[ok])
            delta = torch.as_tensor(a, device=device)[:, :, None] * dec[:, None, :]  # [B,T,d]
            if direct and entry:
                final = _from(model, resid - delta.to(resid.dtype), start, entry, qc)
            else:
                def hook_fn(act, hook):
                    return sp.replace(act, sp.flat(act).float() - delta.reshape(-1, delta.shape[-1]))
                final = _from(model, resid, start, entry, qc, [(sp.out_hook, hook_fn)])
            d = _window_nll(model, final, tg).cpu().numpy() - clean
            out += [np.where(k, e, np.nan).astype(np.float32) for k, e in zip(ok, d)]
    return out


def _from(model, resid, start: int, entry: str, q, hooks=()):
    """The final residual stream (before the final norm) at positions q [B, w] of the model run from `resid`
    entering block `start` (from tokens when there is no entry hook). Where nothing is hooked in the last block,
    that block runs for the positions q alone (`_last_block_at`): its attention reads every position but only
    q's queries are needed, and its MLP acts on each position alone; else the full run keeps q's positions
    after the last block's attention (both exact)."""
    from .common import layer_of

    cfg = model.cfg
    L = cfg.n_layers
    later = any(layer_of(h) is None or layer_of(h) >= L - 1 for h, _ in hooks)
    if start < L and not later and _window_block_ok(model, resid.shape[1]):
        kw = {"stop_at_layer": L - 1, **({"start_at_layer": start} if entry else {})}
        if start < L - 1 or not entry:
            resid = model.run_with_hooks(resid, fwd_hooks=list(hooks), **kw) if hooks else model(resid, **kw)
        return _last_block_at(model.blocks[L - 1], resid, q)
    cut = start < L and not later and not cfg.attn_only and not cfg.parallel_attn_mlp
    hooks = list(hooks)
    if cut:
        hooks.append((f"blocks.{L - 1}.hook_resid_mid", lambda x, hook: _gather(x, q)))
    kw = {"stop_at_layer": L, **({"start_at_layer": start} if entry else {})}
    final = model.run_with_hooks(resid, fwd_hooks=hooks, **kw) if hooks else model(resid, **kw)
    return final if cut else _gather(final, q)


def _window_block_ok(model, T: int) -> bool:
    """Whether `_last_block_at` computes the last block of this HookedTransformer on T positions as TransformerLens does:
    a pre-norm block with a plain attention (global or local, causal or not; no position-dependent parts
    other than rotary or learned absolute embeddings, no per-head inputs) and an MLP after it."""
    try:
        from transformer_lens.components import Attention, GroupedQueryAttention, TransformerBlock
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:
        return False
    cfg = model.cfg
    blocks = getattr(model, "blocks", None)
    if not blocks or type(blocks[-1]) is not TransformerBlock or type(blocks[-1].attn) not in (Attention, GroupedQueryAttention):
        return False
    attn = blocks[-1].attn
    flags = ("attn_only", "parallel_attn_mlp", "use_split_qkv_input", "use_attn_in", "use_attn_result", "use_logn_attn",
             "use_attention_sinks", "use_dynamic_ntk_rope", "load_in_4bit")
    if any(getattr(cfg, f, False) for f in flags) or getattr(cfg, "clip_qkv", None) is not None:
        return False
    if cfg.original_architecture in POST_NORM_ARCHITECTURES or getattr(attn, "q_norm", None) is not None:
        return False
    if getattr(attn, "_attention_dir_override", None) is not None:
        return False
    if cfg.positional_embedding_type == "rotary":
        return attn.rotary_cos.shape[0] >= T  # TransformerLens extends its tables beyond that
    return cfg.positional_embedding_type == "standard"


def _last_block_at(block, x, q, kv=None):
    """The residual stream after TransformerLens's `block` at positions q [B, w], from its input x [B, T, d]:
    keys and values from every position, queries from q's alone; the mask, rotary angles and everything after
    the attention at q's positions (see `_window_block_ok` for the blocks this holds for). With kv = (K, V, ok),
    x is the input at q's positions alone [B, w, d], and K, V [B, T, heads, d_head] are the block's keys (rotated)
    and values for an input that differs from it only at the positions q[ok] (unique in each row): K and V are
    overwritten there with what x gives, the rest taken as they are."""
    import torch
    import torch.nn.functional as F

    attn, cfg = block.attn, block.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    if kv is None:
        xn = block.ln1(x)
        qn = _gather(xn, q)
        qh, k, v = attn.calculate_qkv_matrices(qn, xn, xn)
        if rotary:
            k = _rotate(attn, k, torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1))
    else:
        k, v, ok = kv
        qn = block.ln1(x)
        qh, kq, vq = attn.calculate_qkv_matrices(qn, qn, qn)
        if rotary:
            kq = _rotate(attn, kq, q)
        rows = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(q)[ok]
        k.index_put_((rows, q[ok]), kq[ok].to(k.dtype))
        v.index_put_((rows, q[ok]), vq[ok].to(v.dtype))
    if rotary:
        qh = _rotate(attn, qh, q)
    scores = attn.calculate_attention_scores(qh, k)  # [B, H, w, T]
    if cfg.attention_dir == "causal":
        keys = torch.arange(k.shape[1], device=x.device)
        mask = keys[None, None, :] <= q[:, :, None]
        if attn.attn_type == "local":
            mask = mask & (keys[None, None, :] > q[:, :, None] - cfg.window_size)
        scores = torch.where(mask[:, None], scores, attn.IGNORE.to(scores.device))
    pattern = F.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern).to(v.dtype)
    z = attn.calculate_z_scores(v, pattern)  # [B, w, H, d_head]
    w = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[-1], -1)  # [d_model, H * d_head]
    out = F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, attn.b_O)
    if cfg.use_normalization_before_and_after:
        out = block.ln1_post(out)
    mid = (x if kv is not None else _gather(x, q)) + out
    return mid + block.apply_mlp(block.ln2(mid))


def _rotate(attn, x, pos):
    """TransformerLens's rotary embedding of x [B, n, heads, d_head] at positions pos [B, n]."""
    import torch

    rd = attn.cfg.rotary_dim
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos, sin = attn.rotary_cos[pos][:, :, None, :], attn.rotary_sin[pos][:, :, None, :]
    return torch.cat([x_rot * cos + attn.rotate_every_two(x_rot) * sin, x_pass], dim=-1)


def _gather(x, q):
    return x.gather(1, q[:, :, None].expand(-1, -1, x.shape[-1]))


def _window_nll(model, x, tg):
    """The targets' negative log-probabilities from the final residual stream at some positions [B, w, d]:
    the final norm and the unembedding act on each position alone, as in the full forward."""
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = model.unembed(x).float()
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        logits = cap * (logits / cap).tanh()
    return logits.logsumexp(-1) - logits.gather(-1, tg[..., None]).squeeze(-1)


def prompt_view(model, saes: list, prompts: list, k_feat: int, k_pred: int, device: str) -> list:
    """Per prompt (token ids): per SAE the k_feat features firing most on each token, and the model's top k_pred
    predictions at each token."""
    import torch

    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.as_tensor(np.asarray(ids)[None], device=device)
            codes = {}
            hooks = []
            for i, sp in enumerate(saes):
                hooks.append((sp.hook, lambda a, hook, i=i, sp=sp: codes.__setitem__(i, sp.encode(sp.flat(a)))))
            logits = model.run_with_hooks(x, fwd_hooks=hooks)[0].float()
            pr = logits.softmax(-1).topk(min(k_pred, logits.shape[-1]), dim=-1)
            per = []
            for i, sp in enumerate(saes):
                f = codes[i].float()
                t = f.topk(min(k_feat, f.shape[1]), dim=1)
                per.append({"ids": t.indices.cpu().numpy(), "vals": t.values.cpu().numpy()})
            out.append({"tokens": np.asarray(ids), "pred_ids": pr.indices.cpu().numpy(),
                        "pred_probs": pr.values.cpu().numpy(), "saes": per})
    return out


def finish(model, saes: list, streams: list, recon: list, var_tokens: int, need: dict, inputs, targets, scored_loss,
           clean: list, loss_seqs: int, device: str, batch: int, kept: dict | None = None, clean_nll=None) -> list:
    """One summary per SAE: the streamed statistics, reconstruction quality, spliced-in / zero-ablated loss,
    logit tables, decoder neighbours; the chosen features' ablation effects; the prompts' view."""
    out = []
    for sp, st, r in zip(saes, streams, recon):
        s = st.result()
        if r["sum"] is not None and var_tokens:
            var = (r["sq"] - r["sum"] ** 2 / var_tokens).sum().item()
            s["explained_variance"] = 1.0 - r["err"] / var if var > 0 else float("nan")
        else:
            s["explained_variance"] = float("nan")
        s["variance_tokens"] = int(var_tokens)
        losses = {}
        entry, _ = entry_hook(sp, model.cfg.n_layers)
        if loss_seqs and clean[1]:
            losses["clean"] = clean[0] / clean[1]
            for name, v in spliced_losses(model, sp, inputs[:loss_seqs], targets[:loss_seqs], scored_loss, device,
                                          batch, (kept or {}).get(entry)).items():
                losses[name] = v / clean[1]
        s.update({"losses": losses, "loss_seqs": int(loss_seqs), "loss_tokens": int(clean[1]), "hook": sp.hook,
                  "out_hook": sp.out_hook, "transcoder": sp.transcoder, "architecture": sp.arch, "name": sp.name,
                  "d_sae": sp.d_sae, "d_in": sp.d_in, "head": sp.head})
        s.update(logit_tables(model, sp, int(need.get("logits", 10))))
        s.update(neighbours(sp, int(need.get("neighbours", 6))))
        s["head_shares"] = head_shares(sp, model)
        choose = need.get("choose")
        chosen = [int(j) for j in choose(s)] if choose else []
        s["chosen"] = chosen
        per = int(need.get("ablate", 0))
        pairs = [(j, int(t), w) for j in chosen for t, w in zip(s["top_tok"][j][:per], s["top_win"][j][:per]) if t >= 0]
        s["ablation"] = {}
        if pairs:
            kv = last_block_kv(model, sp, inputs.shape[1])
            kv = None if kv is None or not kept or kv[0] not in kept else (kept[kv[0]], kept[kv[1]])
            eff = ablation_effects(model, sp, pairs, inputs, targets, device, batch, (kept or {}).get(entry), clean_nll,
                                   kv)
            for (j, t, _), e in zip(pairs, eff):
                s["ablation"].setdefault(j, {})[t] = e
        out.append(s)
    prompts = need.get("prompts") or []
    if prompts:
        view = prompt_view(model, saes, prompts, int(need.get("prompt_features", 5)), max(int(need.get("top_predictions", 3)), 1),
                           device)
        for i, s in enumerate(out):
            s["prompts"] = [{"tokens": p["tokens"], "pred_ids": p["pred_ids"], "pred_probs": p["pred_probs"],
                             **p["saes"][i]} for p in view]
    return out
