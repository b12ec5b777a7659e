"""The seed-004 RestorationModel: a pre-norm RoPE transformer, and its conversion to TransformerLens.

Checkpoint layout (shared/seeds/004): `{"model_state_dict", "config", "vocab_size"}` with keys

    embed.weight                    [V, D]
    layers.i.ln1.{weight,bias}      [D]
    layers.i.attn.{q,k,v}_proj.weight  [H*dh, D]   (no bias)
    layers.i.attn.out_proj.weight   [D, H*dh]
    layers.i.ln2.{weight,bias}      [D]
    layers.i.ff.0.{weight,bias}     [d_ff, D], [d_ff]   (Linear, GELU, Linear)
    layers.i.ff.2.{weight,bias}     [D, d_ff], [D]
    final_ln.{weight,bias}          [D]
    head.{weight,bias}              [V, D], [V]

Attention is bidirectional (a masked-character restoration model) unless the config says
`"causal": true`. RoPE pairs dim i with i + dh/2 (GPT-NeoX "rotate_half") unless
`"rotary_interleaved": true` (GPT-J pairs 2i, 2i+1).

`RestorationModel` is a plain-PyTorch reference forward of those weights; `to_hooked` builds the
equivalent `HookedTransformer` with no weight processing, so the residual stream is the original one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

SEED_FIELDS = ("vocab_size", "max_position", "d_model", "n_heads", "d_ff", "n_layers", "dropout", "rotary_base")
EXTRA_FIELDS = ("causal", "rotary_interleaved", "layer_norm_eps", "mask_token_id", "pad_token_id")


@dataclass
class RestorationConfig:
    vocab_size: int
    max_position: int
    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    dropout: float = 0.1
    rotary_base: float = 10000.0
    causal: bool = False
    rotary_interleaved: bool = False
    layer_norm_eps: float = 1e-5
    mask_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "RestorationConfig":
        """Validated config; unknown keys are an error (ValueError names them)."""
        unknown = sorted(set(d) - set(SEED_FIELDS) - set(EXTRA_FIELDS))
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}")
        missing = [k for k in SEED_FIELDS[:6] if k not in d]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}")
        cfg = cls(**d)
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"head size {cfg.d_model // cfg.n_heads} is odd; RoPE needs an even head size")
        return cfg

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(cfg: RestorationConfig, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, dh] laid out for the config's pairing."""
    dh = cfg.d_head
    inv = cfg.rotary_base ** (-torch.arange(0, dh, 2, dtype=torch.float64, device=device) / dh)  # [dh/2]
    ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None, :]  # [n, dh/2]
    ang = ang.repeat_interleave(2, dim=-1) if cfg.rotary_interleaved else torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [..., T, dh] rotated by position."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: RestorationConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, dh = self.cfg.n_heads, self.cfg.d_head
        q, k, v = (p(x).view(B, T, H, dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # [B,H,T,dh]
        q = apply_rope(q, cos, sin, self.cfg.rotary_interleaved)
        k = apply_rope(k, cos, sin, self.cfg.rotary_interleaved)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B,H,T,T]
        if self.cfg.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        out = scores.softmax(-1) @ v  # [B,H,T,dh]
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * dh))


class Block(nn.Module):
    def __init__(self, cfg: RestorationConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + self.ff(self.ln2(x))


class RestorationModel(nn.Module):
    """Reference forward of the seed's weights: tokens [B,T] -> logits [B,T,V] (eval semantics, no dropout)."""

    def __init__(self, cfg: RestorationConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_tables(self.cfg, tokens.shape[1], tokens.device)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.final_ln(x))


def hooked_config(cfg: RestorationConfig, device: str = "cpu"):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_ff,
        d_vocab=cfg.vocab_size, n_ctx=cfg.max_position, act_fn="gelu", normalization_type="LN",
        eps=cfg.layer_norm_eps, positional_embedding_type="rotary", rotary_dim=cfg.d_head,
        rotary_base=cfg.rotary_base, rotary_adjacent_pairs=cfg.rotary_interleaved,
        attention_dir="causal" if cfg.causal else "bidirectional", default_prepend_bos=False,
        tokenizer_name=None, device=device,
    )


def to_hooked_state_dict(sd: dict, cfg: RestorationConfig) -> dict:
    """The seed's keys mapped onto HookedTransformer's (weights reshaped, absent biases as zeros)."""
    H, dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    out = {"embed.W_E": sd["embed.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            out[f"{q}{ln}.w"] = sd[f"{p}{ln}.weight"]
            out[f"{q}{ln}.b"] = sd[f"{p}{ln}.bias"]
        for x in "QKV":
            w = sd[f"{p}attn.{x.lower()}_proj.weight"]  # [(h dh), D]
            out[f"{q}attn.W_{x}"] = w.reshape(H, dh, D).transpose(1, 2).contiguous()  # [h, D, dh]
            out[f"{q}attn.b_{x}"] = torch.zeros(H, dh, dtype=w.dtype)
        w = sd[f"{p}attn.out_proj.weight"]  # [D, (h dh)]
        out[f"{q}attn.W_O"] = w.reshape(D, H, dh).permute(1, 2, 0).contiguous()  # [h, dh, D]
        out[f"{q}attn.b_O"] = torch.zeros(D, dtype=w.dtype)
        out[f"{q}mlp.W_in"] = sd[f"{p}ff.0.weight"].T.contiguous()
        out[f"{q}mlp.b_in"] = sd[f"{p}ff.0.bias"]
        out[f"{q}mlp.W_out"] = sd[f"{p}ff.2.weight"].T.contiguous()
        out[f"{q}mlp.b_out"] = sd[f"{p}ff.2.bias"]
    out["ln_final.w"] = sd["final_ln.weight"]
    out["ln_final.b"] = sd["final_ln.bias"]
    out["unembed.W_U"] = sd["head.weight"].T.contiguous()
    out["unembed.b_U"] = sd["head.bias"]
    return out


def expected_shapes(cfg: RestorationConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the seed's model has, with its shape under `cfg`."""
    V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    shapes = {"embed.weight": (V, D), "final_ln.weight": (D,), "final_ln.bias": (D,), "head.weight": (V, D), "head.bias": (V,)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({f"{p}ln1.weight": (D,), f"{p}ln1.bias": (D,), f"{p}ln2.weight": (D,), f"{p}ln2.bias": (D,),
                       f"{p}attn.q_proj.weight": (D, D), f"{p}attn.k_proj.weight": (D, D),
                       f"{p}attn.v_proj.weight": (D, D), f"{p}attn.out_proj.weight": (D, D),
                       f"{p}ff.0.weight": (F, D), f"{p}ff.0.bias": (F,), f"{p}ff.2.weight": (D, F), f"{p}ff.2.bias": (D,)})
    return shapes


def to_hooked(sd: dict, cfg: RestorationConfig, device: str = "cpu"):
    """A HookedTransformer holding exactly these weights (no folding or centring: the residual stream
    is the original model's, so SAEs trained on either match)."""
    from .tl import hooked_transformer

    return hooked_transformer(hooked_config(cfg, device), to_hooked_state_dict(sd, cfg), device)
