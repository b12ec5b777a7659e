"""How closely our bfloat16 TRM forward (--dtype config) follows upstream's own bfloat16 forward on the
upstream fixture, and what moves it. Prints figures; never part of the test run.

(a) agreement per ACT step with tests/data/trm_upstream_bf16_cpu.npz (upstream's code, bf16, CPU):
    fraction of cells with upstream's prediction, of rows with upstream's exact q_halt, of logits
    with the same bits, for our forward as it is, with one cast moved (what a regression looks like),
    and with the matmul or attention rounding changed (what other kernels, e.g. a GPU's, do);
(b) one bf16 matmul / attention of this CPU against the exactly rounded result (float64
    accumulation, one rounding to bf16) on the fixture's real activations, first ACT step: how
    many outputs differ, and by how many units in the last place of the exact value.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/trm_bf16_agreement.py
"""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def variants(T, F, torch):
    """name -> (object, attribute, replacement) for each way of running the forward differently."""
    def rms_norm_bf16(x, eps):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)

    def attention_rope_bf16(self, h, rope):
        cos, sin = (t.to(h.dtype) for t in rope)
        return attention(self, h, (cos, sin), rope_dtype=h.dtype)

    def attention(self, h, rope, rope_dtype):
        B, L, D = h.shape
        q, k, v = self.qkv_proj(h).view(B, L, 3, self.H, self.d).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = ((t.to(rope_dtype) * cos + T.rotate_half(t.to(rope_dtype)) * sin).to(h.dtype) for t in (q, k))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))

    def head_f32(self, x):  # lm_head / q_head on float32 activations and weights
        return F.linear(x.float(), self.weight, self.bias)

    def lin_exact(self, x):  # exactly rounded: float64 accumulation, one rounding
        b = None if self.bias is None else self.bias.to(x.dtype).double()
        return F.linear(x.double(), self.weight.to(x.dtype).double(), b).to(x.dtype)

    def sdpa_softmax_f32(q, k, v, **kw):
        s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        return (s.softmax(-1) @ v.float()).to(q.dtype)

    def block_residual_f32(self, h, rope):
        h = T.rms_norm(h.float() + self.self_attn(h, rope).float(), self.eps).to(h.dtype)
        return T.rms_norm(h.float() + self.mlp(h).float(), self.eps).to(h.dtype)

    return {
        "as is": None,
        "regression: rms_norm in bf16": (T, "rms_norm", rms_norm_bf16),
        "regression: RoPE in bf16": (T.Attention, "forward", attention_rope_bf16),
        "regression: residual sums in float32": (T.Block, "forward", block_residual_f32),
        "regression: lm_head in float32": ("lm_head", "forward", head_f32),
        "regression: q_head in float32": ("q_head", "forward", head_f32),
        "kernel: matmuls exactly rounded": (T.CastedLinear, "forward", lin_exact),
        "kernel: attention as float32 softmax": (F, "scaled_dot_product_attention", sdpa_softmax_f32),
    }


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import reportgen.models.trm as T
    from conftest import run_act
    from make_trm_upstream_bf16 import DATA, REFERENCE, RUN, kernel_fingerprint, sha256
    from test_loading import load
    from reportgen.data.puzzles import read_split

    torch.set_num_threads(1)
    ref = np.load(REFERENCE)
    ds = read_split(DATA, "test")
    same = kernel_fingerprint() == str(ref["kernel_fingerprint"])
    print(f"(a) vs upstream's bf16 forward ({REFERENCE.name}; this machine's kernels "
          f"{'match' if same else 'DIFFER from'} the reference's)")
    print(f"    {'':40s} {'cells agreeing per ACT step':31s} {'q_halt equal':26s} logits same bits (last step)")
    table = variants(T, F, torch)
    for name, patch in table.items():
        model = load(RUN / "step_400", DATA).model
        model.cfg.forward_dtype = "bfloat16"
        if patch is None:
            ctx = contextlib.nullcontext()
        else:
            obj, attr, fn = patch
            if isinstance(obj, str):  # one module of this model
                mod = getattr(model, obj)
                ctx = patched(mod, attr, fn.__get__(mod))
            else:
                ctx = patched(obj, attr, fn)
        with ctx:
            steps, _, _ = run_act(model, ds.inputs, ds.puzzle_identifiers)
        cells = [(lg.argmax(-1).numpy() == ref["preds"][t]).mean() for t, (lg, _, _) in enumerate(steps)]
        qh = [(q.numpy() == ref["q_halt"][t]).mean() for t, (_, q, _) in enumerate(steps)]
        bits = steps[-1][0].dtype == torch.bfloat16 and sha256(steps[-1][0]) == str(ref["logits_sha256"][-1])
        print(f"    {name:40s} {' '.join(f'{c:7.2%}' for c in cells):31s} {' '.join(f'{q:6.1%}' for q in qh):26s} "
              f"{'yes' if bits else 'no'}")

    print("(b) one bf16 op of this CPU vs exactly rounded, fixture activations, first ACT step")
    model = load(RUN / "step_400", DATA).model
    model.cfg.forward_dtype = "bfloat16"
    stats = defaultdict(lambda: [0, []])  # outputs, distances (in ulp of the exact value) of those that differ

    def tally(key, out, exact):
        diff = out != exact
        e = torch.frexp(exact[diff].float().abs().clamp_min(2.0 ** -126))[1] - 8  # bf16 ulp exponent
        stats[key][0] += out.numel()
        stats[key][1].append((out[diff].float() - exact[diff].float()).abs() / torch.ldexp(torch.ones(e.shape), e))

    def hook(name):
        def f(mod, args, out):
            x, w = args[0], mod.weight.to(args[0].dtype)
            b = None if mod.bias is None else mod.bias.to(x.dtype).double()
            tally(f"{name} {list(x.shape)} x {list(w.shape)}", out, F.linear(x.double(), w.double(), b).to(x.dtype))
        return f

    for n, mod in model.named_modules():
        if isinstance(mod, T.CastedLinear):
            mod.register_forward_hook(hook(n.replace("L_level.layers.", "layer ")))
    sdpa = F.scaled_dot_product_attention

    def sdpa_tallied(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        exact = ((q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1) @ v.double()
        tally(f"attention {list(q.shape)}", out, exact.to(q.dtype))
        return out

    with patched(F, "scaled_dot_product_attention", sdpa_tallied), torch.inference_mode():
        x = model.input_embeddings(torch.as_tensor(ds.inputs), torch.as_tensor(ds.puzzle_identifiers))
        model.act_step(*model.initial_carry(len(ds.inputs), "cpu"), x)
    for key, (n, dist) in sorted(stats.items()):
        dist = torch.cat(dist)
        print(f"    {key:55s} {len(dist) / n:8.4%} of {n:>10,} outputs differ, "
              f"by a median {dist.median():.0f} ulp" if len(dist) else f"    {key:55s} none of {n:>10,} outputs differs")


if __name__ == "__main__":
    main()
