"""Half-precision weights, float32 arithmetic, on CPUs without native bfloat16/float16 matrix multiplication.

`--dtype bfloat16` keeps a model's weights in half the memory. On a GPU, and on CPUs with AVX512-BF16 or AMX,
the model then also runs in that dtype. Many CPUs have neither: there PyTorch's bfloat16 matmul is emulated and
runs at well under 1% of float32's (measured here: 0.2 against 45 GFLOP/s on one AVX2 core), so a 1B-parameter
report would take hours. `float32_compute` keeps the weights in half precision and, one block at a time, hands
the block float32 copies of its parameters and buffers and a float32 residual stream; the unembedding runs in
float32 vocabulary slices. The extra memory is one block's float32 parameters (or one vocabulary slice), not a
float32 model. Used for inference only: with gradients enabled (the gradient-flow analysis), the model runs in
its own dtype.
"""
from __future__ import annotations

import contextlib
import functools
import time

VOCAB_SLICE = 16384  # unembedding columns cast to float32 at a time


@functools.lru_cache(maxsize=None)
def half_matmul_ratio(dtype_name: str) -> float:
    """How many times slower a small `dtype_name` matmul is than float32 on this CPU (median of 3)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(32, 256), torch.randn(256, 256)

    def timed(x, y):
        x @ y  # warm-up
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[1]

    f32 = timed(a, b)
    half = timed(a.to(dt), b.to(dt))
    return half / max(f32, 1e-9)


def wanted(model, device: str) -> str | None:
    """The half dtype whose arithmetic should run in float32 here (None: run the model as it is)."""
    import torch

    if not str(device).startswith("cpu"):
        return None
    dt = getattr(getattr(model, "cfg", None), "dtype", None)
    if dt not in (torch.bfloat16, torch.float16) or not hasattr(model, "blocks") or not hasattr(model, "unembed"):
        return None
    name = str(dt).removeprefix("torch.")
    return name if half_matmul_ratio(name) > 4.0 else None


@contextlib.contextmanager
def float32_compute(model):
    """Within the block, inference forwards of the HookedTransformer `model` (half-precision weights) compute in
    float32 as described above; the weights stay in their dtype."""
    import torch

    cfg = model.cfg
    old_dtype = cfg.dtype
    handles = []

    def to32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32 else x

    def pre(module, args, kwargs):
        if torch.is_grad_enabled():
            return None
        saved = []
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                saved.append((t, t.data))
                t.data = t.data.float()
        module._rg_saved = saved
        return tuple(to32(a) for a in args), {k: to32(v) for k, v in kwargs.items()}

    def post(module, args, kwargs, output):
        for t, data in getattr(module, "_rg_saved", ()):
            t.data = data
        module._rg_saved = ()
        return None

    unembed = model.unembed
    plain_forward = type(unembed).forward.__get__(unembed)

    def unembed_forward(residual):
        if torch.is_grad_enabled():
            return plain_forward(residual)
        W, b = unembed.W_U, getattr(unembed, "b_U", None)
        x = residual.float()
        V = W.shape[1]
        out = torch.empty(*x.shape[:-1], V, dtype=torch.float32, device=x.device)
        for j in range(0, V, VOCAB_SLICE):
            k = min(V, j + VOCAB_SLICE)
            out[..., j:k] = x @ W[:, j:k].float()
            if b is not None:
                out[..., j:k] += b[j:k].float()
        return out

    def model_pre(module, args, kwargs):  # the components' own casts (norms, patterns) then keep float32
        cfg.dtype = old_dtype if torch.is_grad_enabled() else torch.float32

    def model_post(module, args, kwargs, output):
        cfg.dtype = old_dtype

    try:
        handles.append(model.register_forward_pre_hook(model_pre, with_kwargs=True))
        handles.append(model.register_forward_hook(model_post, with_kwargs=True))
        for m in [*model.blocks, model.ln_final] if hasattr(model, "ln_final") else list(model.blocks):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        unembed.forward = unembed_forward
        yield
    finally:
        cfg.dtype = old_dtype
        for h in handles:
            h.remove()
        unembed.__dict__.pop("forward", None)
        for m in model.modules():
            for t, data in getattr(m, "_rg_saved", ()) or ():
                t.data = data
            if hasattr(m, "_rg_saved"):
                del m._rg_saved
