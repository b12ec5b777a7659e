"""Tiny Recursive Model (TRM), ACT variant, re-implemented from the upstream semantics.

Parameter and buffer names match the upstream `TinyRecursiveReasoningModel_ACTV1_Inner` once the
`_orig_mod.model.inner.` prefix is stripped, so an upstream `step_N` state dict loads as it is
(see shared/specs/trm.md §2-3). Shapes in comments: B batch, S cells (81), P prefix positions,
L = P + S, D hidden, H heads, d = D / H, V vocab, I SwiGLU width.

With forward_dtype bfloat16 (or float16) it casts where upstream casts (spec §2.1): float32 master
weights cast to the input's dtype at every linear layer, activations, residual sums and carries in
that dtype, rms_norm and RoPE in float32 cast back, q logits cast to float32. On the same CPU this
gives upstream's own bfloat16 forward bit for bit (tests/test_trm_bf16.py).

The model is differentiable (examples/sudoku/train.py trains it), but reportgen itself only runs
it under `torch.inference_mode()` through `TRM.act_step`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def inner_width(expansion: float, width: int) -> int:
    """SwiGLU inner width: round(expansion * width * 2/3), rounded up to a multiple of 256."""
    w = round(expansion * width * 2 / 3)
    return ((w + 255) // 256) * 256


@dataclass
class TRMConfig:
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4
    H_cycles: int = 3
    L_cycles: int = 6
    L_layers: int = 2
    halt_max_steps: int = 16
    puzzle_emb_ndim: int = 512
    puzzle_emb_len: int = 16
    pos_encodings: str = "rope"  # rope | learned | none
    forward_dtype: str = "bfloat16"
    mlp_t: bool = False
    vocab_size: int = 11
    seq_len: int = 81
    num_puzzle_identifiers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # where each field came from (e.g. "all_config.yaml", "tensor shapes"); shown in the report
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.puzzle_emb_len == 0 and self.puzzle_emb_ndim > 0:
            self.puzzle_emb_len = -(-self.puzzle_emb_ndim // self.hidden_size)
        if self.pos_encodings not in ("rope", "learned", "none"):
            raise ValueError(f"pos_encodings must be rope, learned or none, not {self.pos_encodings!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.forward_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"forward_dtype must be float32, bfloat16 or float16, not {self.forward_dtype!r}")

    @property
    def prefix_len(self) -> int:
        return self.puzzle_emb_len if self.puzzle_emb_ndim > 0 else 0

    @property
    def total_len(self) -> int:
        return self.prefix_len + self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("sources")
        return d


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last axis, computed in float32, returned in x's dtype."""
    dt = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(dt)


class CastedLinear(nn.Module):
    """Linear layer with float32 master weights cast to the input's dtype at use."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=1.0 / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


class CastedEmbedding(nn.Module):
    def __init__(self, num: int, dim: int, std: float):
        super().__init__()
        self.embedding_weight = nn.Parameter(torch.empty(num, dim))
        nn.init.trunc_normal_(self.embedding_weight, std=std)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(dtype))


class PuzzleEmbedding(nn.Module):
    """Per-puzzle-identifier vectors; a persistent buffer upstream (trained by SignSGD there)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.register_buffer("weights", torch.zeros(num, dim))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weights[ids].to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, width: int, expansion: float):
        super().__init__()
        inner = inner_width(expansion, width)
        self.gate_up_proj = CastedLinear(width, 2 * inner, bias=False)  # [2I, width]
        self.down_proj = CastedLinear(inner, width, bias=False)  # [width, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # first half gate, second half up
        return self.down_proj(F.silu(gate) * up)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.H = cfg.num_heads
        self.d = cfg.hidden_size // cfg.num_heads
        self.qkv_proj = CastedLinear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)  # [q heads|k heads|v heads]
        self.o_proj = CastedLinear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, L, D = h.shape
        qkv = self.qkv_proj(h).view(B, L, 3, self.H, self.d).permute(2, 0, 3, 1, 4)  # [3, B, H, L, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            cos, sin = rope  # [L, d] float32
            dt = q.dtype
            qf, kf = q.float(), k.float()
            q = (qf * cos + rotate_half(qf) * sin).to(dt)
            k = (kf * cos + rotate_half(kf) * sin).to(dt)
        o = F.scaled_dot_product_attention(q, k, v)  # non-causal, scale 1/sqrt(d), no mask
        return self.o_proj(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Post-norm block: (token-mixing attention or mlp_t) then a feature SwiGLU."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        if cfg.mlp_t:
            self.mlp_t = SwiGLU(cfg.total_len, cfg.expansion)  # mixes along the sequence axis
        else:
            self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.expansion)

    def forward(self, h: torch.Tensor, rope) -> torch.Tensor:
        if hasattr(self, "mlp_t"):
            t = h.transpose(1, 2)  # [B, D, L]
            h = rms_norm(t + self.mlp_t(t), self.eps).transpose(1, 2)
        else:
            h = rms_norm(h + self.self_attn(h, rope), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class ReasoningModule(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.L_layers))

    def forward(self, h: torch.Tensor, injection: torch.Tensor, rope) -> torch.Tensor:
        h = h + injection
        for layer in self.layers:
            h = layer(h, rope)
        return h


class TRM(nn.Module):
    """The inner TRM network plus the ACT step logic used at evaluation."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed_scale = math.sqrt(D)
        std = 1.0 / self.embed_scale
        self.embed_tokens = CastedEmbedding(cfg.vocab_size, D, std)
        self.lm_head = CastedLinear(D, cfg.vocab_size, bias=False)
        self.q_head = CastedLinear(D, 2, bias=True)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        if cfg.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(cfg.num_puzzle_identifiers, cfg.puzzle_emb_ndim)
        if cfg.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(cfg.total_len, D, std)
        self.L_level = ReasoningModule(cfg)
        self.register_buffer("H_init", torch.nn.init.trunc_normal_(torch.empty(D), std=1.0))
        self.register_buffer("L_init", torch.nn.init.trunc_normal_(torch.empty(D), std=1.0))
        # registration order above differs from upstream's file order; names are what matter
        self._rope_cache: dict = {}

    # --- pieces ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.forward_dtype)

    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.pos_encodings != "rope" or self.cfg.mlp_t:
            return None
        key = str(device)
        if key not in self._rope_cache:
            d = self.cfg.hidden_size // self.cfg.num_heads
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
            t = torch.arange(self.cfg.total_len, dtype=torch.float32, device=device)
            freqs = torch.outer(t, inv)
            emb = torch.cat((freqs, freqs), dim=-1)  # [L, d]
            self._rope_cache[key] = (emb.cos(), emb.sin())
        return self._rope_cache[key]

    def input_embeddings(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        cfg, dt = self.cfg, self.dtype
        emb = self.embed_tokens(inputs.long(), dt)  # [B, S, D]
        if cfg.puzzle_emb_ndim > 0:
            pe = self.puzzle_emb(puzzle_identifiers.long(), dt)  # [B, ndim]
            pad = cfg.puzzle_emb_len * cfg.hidden_size - pe.shape[-1]
            if pad > 0:
                pe = F.pad(pe, (0, pad))
            emb = torch.cat((pe.view(-1, cfg.puzzle_emb_len, cfg.hidden_size), emb), dim=-2)  # [B, L, D]
        if cfg.pos_encodings == "learned":
            emb = 0.707106781 * (emb + self.embed_pos.embedding_weight.to(dt))
        return self.embed_scale * emb

    def initial_carry(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Carry reset as upstream does for halted rows: H_init / L_init at every position."""
        shape = (batch_size, self.cfg.total_len, self.cfg.hidden_size)
        z_H = self.H_init.to(device=device, dtype=self.dtype).expand(shape).clone()
        z_L = self.L_init.to(device=device, dtype=self.dtype).expand(shape).clone()
        return z_H, z_L

    # --- one ACT step -----------------------------------------------------------------------
    def act_step(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, on_cycle=None):
        """One ACT step of the inner model (spec §3.3).

        z_H, z_L: [B, L, D]; x: input embeddings [B, L, D].
        Returns (z_H, z_L, logits [B, S, V], q_halt [B] float32, q_continue [B] float32).
        Only the last H cycle keeps gradients, as upstream does (irrelevant for inference).
        `on_cycle(level, z_H, z_L)`, if given, is called after every update, in order: level "L" after each of
        the L_cycles z_L updates of an H cycle, then "H" after that cycle's z_H update (the last call of a step
        sees the step's carry).
        """
        cfg, rope = self.cfg, self.rope(x.device)
        cb = on_cycle or (lambda level, h, l: None)
        with torch.set_grad_enabled(False):
            for _ in range(cfg.H_cycles - 1):
                for _ in range(cfg.L_cycles):
                    z_L = self.L_level(z_L, z_H + x, rope)
                    cb("L", z_H, z_L)
                z_H = self.L_level(z_H, z_L, rope)
                cb("H", z_H, z_L)
        for _ in range(cfg.L_cycles):
            z_L = self.L_level(z_L, z_H + x, rope)
            cb("L", z_H, z_L)
        z_H = self.L_level(z_H, z_L, rope)
        cb("H", z_H, z_L)
        logits = self.lm_head(z_H)[:, cfg.prefix_len:]
        q = self.q_head(z_H[:, 0]).float()
        return z_H, z_L, logits, q[..., 0], q[..., 1]
