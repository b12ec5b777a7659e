"""A user's own PyTorch model, described by an adapter (reportgen/adapter.py), behind the small part of the
HookedTransformer interface the language-model probe drives (reportgen/probes/lm.py):

- `model(tokens)` → logits; `model(x, start_at_layer=i, stop_at_layer=j)` runs the declared embedding,
  blocks i..j-1, final norm and unembedding (the residual stream in and out);
- `run_with_hooks(tokens, fwd_hooks=[(name, fn)], stop_at_layer=...)` with the hook names
  `blocks.{i}.attn.hook_pattern` ([B,H,q,k], from the declared attention), `blocks.{i}.hook_resid_pre` and
  `blocks.{i}.hook_resid_post` (the inputs / outputs of the declared block modules; a hook that returns a
  tensor replaces the activation);
- `cfg` (n_layers, n_heads, d_model, d_vocab, n_ctx, d_mlp, d_head, attention_dir, dtype), `W_U`,
  `named_parameters()` (block parameters named `blocks.{i}.…`, the embedding `embed.…`, the final norm
  `ln_final.…`, the unembedding `unembed.…`, so gradient flow groups them by layer), `parameters()`,
  `zero_grad()`, `to()`, `eval()`.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from ..errors import ReportgenError, first_line

HOOK = re.compile(r"^blocks\.(\d+)\.(attn\.hook_pattern|hook_resid_pre|hook_resid_post)$")


def adapter_file(spec: str) -> Path | None:
    """The file an adapter spec names: FILE.py itself, or the module's source for module:function."""
    if spec.endswith(".py") or "/" in spec or ":" not in spec:
        return Path(spec)
    mod = spec.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found and found.origin and found.origin != "built-in" else None


def load_function(spec: str):
    """The adapter function of FILE.py (its `adapter`) or module:function; (function, label for errors)."""
    if spec.endswith(".py") or ":" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise ReportgenError(f"{spec}: adapter file not found (--adapter)")
        name = f"reportgen_adapter_{abs(hash(str(path.resolve())))}"
        try:
            loader = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(loader)
            sys.path.insert(0, str(path.resolve().parent))  # so it can import its own model.py
            try:
                loader.loader.exec_module(mod)
            finally:
                sys.path.remove(str(path.resolve().parent))
        except Exception as e:  # noqa: BLE001 - user code: named, not a traceback
            raise ReportgenError(f"{spec}: adapter cannot be imported ({type(e).__name__}: {first_line(e)})") from None
        fn, label = getattr(mod, "adapter", None), spec
        if not callable(fn):
            raise ReportgenError(f"{spec}: the adapter file defines no function adapter(checkpoint_path, device)")
        return fn, label
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        raise ReportgenError(f"{spec}: adapter module cannot be imported ({type(e).__name__}: {first_line(e)})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ReportgenError(f"{spec}: module {mod_name} has no function {fn_name}")
    return fn, spec


def _module(root, m, what: str, label: str):
    if m is None or not isinstance(m, str):
        return m
    try:
        return root.get_submodule(m)
    except AttributeError:
        raise ReportgenError(f"{label}: {what} {m!r} is not a module of the model") from None


class Hook(SimpleNamespace):
    pass


class AdaptedModel:
    """The facade (see the module docstring)."""

    def __init__(self, a, label: str):
        import torch

        if not isinstance(a.model, torch.nn.Module):
            raise ReportgenError(f"{label}: Adapted.model is {type(a.model).__name__}, not a torch.nn.Module")
        self.a, self.label, self.net = a, label, a.model
        self.embed = _module(self.net, a.embed, "embed", label)
        self.blocks = [_module(self.net, b, "block", label) for b in (a.blocks or [])]
        self.final_norm = _module(self.net, a.final_norm, "final_norm", label)
        self.unembed = _module(self.net, a.unembed, "unembed", label)
        att = a.attention
        self.att_modules = [_module(self.net, m, "attention module", label) for m in att] \
            if isinstance(att, (list, tuple)) else None
        self.att_fn = att if callable(att) else None
        self.chain = self.embed is not None and bool(self.blocks) and self.unembed is not None
        self.cfg = None  # set by check()

    # ---- torch.nn.Module-like
    def to(self, *args, **kw):
        self.net.to(*args, **kw)
        return self

    def eval(self):
        self.net.eval()
        return self

    def parameters(self):
        return self.net.parameters()

    def zero_grad(self, set_to_none: bool = True):
        self.net.zero_grad(set_to_none=set_to_none)

    def named_parameters(self):
        """The model's parameters, those of the declared parts renamed by layer (embed, blocks.i, ln_final, unembed)."""
        names = {}
        parts = [("embed", self.embed)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)] + \
                [("ln_final", self.final_norm), ("unembed", self.unembed)]
        for prefix, mod in parts:
            if mod is not None:
                for n, p in mod.named_parameters():
                    names.setdefault(id(p), f"{prefix}.{n}")
        for n, p in self.net.named_parameters():
            yield names.get(id(p), n), p

    @property
    def W_U(self):
        w = getattr(self.unembed, "weight", None)
        if w is None or w.ndim != 2:
            raise ReportgenError(f"{self.label}: the unembedding has no [V, D] weight (SAE logit effects need one)")
        return w.T

    # ---- forward
    def _block(self, i: int, x):
        out = self.blocks[i](x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _logits(self, x):
        if self.a.logits is not None:
            return self.a.logits(x)
        return self(self.embed(x), start_at_layer=0)

    def __call__(self, x, start_at_layer: int | None = None, stop_at_layer: int | None = None):
        if start_at_layer is None and stop_at_layer is None:
            return self._logits(x)
        if not self.chain:
            raise ReportgenError(f"{self.label}: running from or to a layer needs Adapted.embed, blocks and unembed")
        L = len(self.blocks)
        stop = L if stop_at_layer is None else stop_at_layer
        resid = self.embed(x) if start_at_layer is None else x
        for i in range(start_at_layer or 0, stop):
            resid = self._block(i, resid)
        if stop_at_layer is not None:  # as TransformerLens: the residual stream, even after the last block
            return resid
        if self.final_norm is not None:
            resid = self.final_norm(resid)
        return self.unembed(resid)

    def attention_patterns(self, x):
        """(logits or None, per-layer [B,H,q,k] patterns) from the declared attention."""
        if self.att_fn is not None:
            out = self.att_fn(x)
            if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[1], _tensor_type()):
                return out[0], list(out[1])
            return None, list(out)
        got = {}
        handles = [m.register_forward_hook(lambda mod, i, o, k=k: got.__setitem__(k, o[-1] if isinstance(o, (tuple, list)) else o))
                   for k, m in enumerate(self.att_modules)]
        try:
            logits = self._logits(x)
        finally:
            for h in handles:
                h.remove()
        return logits, [got.get(k) for k in range(len(self.att_modules))]

    def run_with_hooks(self, x, fwd_hooks=(), stop_at_layer: int | None = None):
        patterns, handles = [], []
        for name, fn in fwd_hooks:
            m = HOOK.match(name)
            if not m:
                raise ReportgenError(f"{self.label}: hook point {name!r} is not available for an adapted model")
            i, what = int(m.group(1)), m.group(2)
            hook = Hook(name=name)
            if what == "attn.hook_pattern":
                patterns.append((i, fn, hook))
            elif what == "hook_resid_post":
                def post(mod, inp, out, fn=fn, hook=hook):
                    t = out[0] if isinstance(out, (tuple, list)) else out
                    r = fn(t, hook=hook)
                    if r is None:
                        return None
                    return (r, *out[1:]) if isinstance(out, (tuple, list)) else r
                handles.append(self.blocks[i].register_forward_hook(post))
            else:
                def pre(mod, args, fn=fn, hook=hook):
                    r = fn(args[0], hook=hook)
                    return None if r is None else (r, *args[1:])
                handles.append(self.blocks[i].register_forward_pre_hook(pre))
        try:
            if patterns:
                logits, pats = self.attention_patterns(x)
                for i, fn, hook in patterns:
                    fn(pats[i], hook=hook)
                if stop_at_layer is not None:
                    return None
                return logits if logits is not None else self._logits(x)
            return self(x, stop_at_layer=stop_at_layer) if stop_at_layer is not None else self._logits(x)
        finally:
            for h in handles:
                h.remove()

    # ---- checks
    def check(self, d_vocab_hint: int | None, device: str) -> None:
        """Run the declared parts once on a few tokens and fix cfg; a wrong shape is one ReportgenError line."""
        import torch

        a, label = self.a, self.label
        for f in ("n_heads", "n_ctx"):
            v = getattr(a, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ReportgenError(f"{label}: Adapted.{f} must be a positive integer, not {v!r}")
        if a.logits is None and not self.chain:
            raise ReportgenError(f"{label}: declare Adapted.logits, or embed, blocks and unembed")
        if a.attention is not None and self.att_fn is None and self.att_modules is None:
            raise ReportgenError(f"{label}: Adapted.attention must be a function or a list of module names")
        T = min(a.n_ctx, 12)
        V = d_vocab_hint or 2
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, V, (2, T), generator=g).to(device)
        what = "logits"
        try:
            with torch.inference_mode():
                logits = self._logits(x)
                _shape(logits, 3, (2, T, None), "logits(tokens)", label)
                V = int(logits.shape[-1])
                if d_vocab_hint and V < d_vocab_hint:
                    raise ReportgenError(f"{label}: logits have {V} classes but the vocabulary has {d_vocab_hint} tokens")
                L = len(self.blocks) if self.blocks else None
                D = None
                if self.chain:
                    what = "embed/blocks/unembed"
                    resid = self(x, stop_at_layer=0)
                    _shape(resid, 3, (2, T, None), "embed(tokens)", label)
                    D = int(resid.shape[-1])
                    for i in range(L):
                        resid = self._block(i, resid)
                        _shape(resid, 3, (2, T, D), f"block {i}'s output", label)
                    chained = self(resid, start_at_layer=L)
                    if tuple(chained.shape) != tuple(logits.shape) or not torch.allclose(chained.float(), logits.float(), atol=1e-4, rtol=1e-3):
                        raise ReportgenError(f"{label}: embed → blocks → final_norm → unembed does not give the model's "
                                             f"logits (a block missing from Adapted.blocks, or a block that needs more than the residual stream?)")
                if a.attention is not None:
                    what = "attention"
                    _, pats = self.attention_patterns(x)
                    if L is not None and len(pats) != L:
                        raise ReportgenError(f"{label}: attention gives {len(pats)} layers' patterns but Adapted.blocks has {L}")
                    for i, p in enumerate(pats):
                        _shape(p, 4, (2, a.n_heads, T, T), f"layer {i}'s attention", label)
                    L = len(pats)
        except ReportgenError:
            raise
        except Exception as e:  # noqa: BLE001 - user code
            raise ReportgenError(f"{label}: running the adapted model ({what}) failed: {type(e).__name__}: {first_line(e)}") from None
        if L is None:
            L = 1
        self.cfg = SimpleNamespace(n_layers=L, n_heads=a.n_heads, d_model=D or 0, d_vocab=V, n_ctx=a.n_ctx, d_mlp=None,
                                   d_head=(D or 0) // a.n_heads, attention_dir="causal" if a.causal else "bidirectional",
                                   dtype=next(self.net.parameters()).dtype)


def _tensor_type():
    import torch

    return torch.Tensor


def _shape(t, ndim: int, want: tuple, what: str, label: str) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise ReportgenError(f"{label}: {what} returned {type(t).__name__}, not a tensor")
    if t.ndim != ndim or any(w is not None and s != w for s, w in zip(t.shape, want)):
        dims = ", ".join("?" if w is None else str(w) for w in want)
        raise ReportgenError(f"{label}: {what} has shape {list(t.shape)}, expected [{dims}] on 2 sequences of {want[1]} tokens")


def load_adapted(spec: str, ckpt: Path, device: str):
    """(AdaptedModel checked on a few tokens, the Adapted) from the user's adapter for checkpoint `ckpt`."""
    from ..adapter import Adapted

    fn, label = load_function(spec)
    try:
        a = fn(str(ckpt), device)
    except ReportgenError:
        raise
    except Exception as e:  # noqa: BLE001 - user code
        raise ReportgenError(f"{label}: the adapter raised {type(e).__name__} on {ckpt}: {first_line(e)}") from None
    if not isinstance(a, Adapted):
        raise ReportgenError(f"{label}: the adapter returned {type(a).__name__}, not reportgen.adapter.Adapted")
    if a.vocab is not None and (not isinstance(a.vocab, (list, tuple)) or not all(isinstance(t, str) for t in a.vocab)):
        raise ReportgenError(f"{label}: Adapted.vocab must be a list of strings")
    facade = AdaptedModel(a, label)
    facade.net.to(device).eval()
    facade.check(len(a.vocab) if a.vocab else None, device)
    return facade, a
