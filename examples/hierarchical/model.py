"""A small masked character LM with hierarchical sliding-window attention: half the heads of each layer see a
local window of neighbours, the other half see every `stride`-th position (global summary tokens) and
themselves. Attention weights are returned only when asked (forward(x, return_attention=True))."""
import torch
from torch import nn


def swa_mask(T, n_heads, window, stride):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    local = (i - j).abs() <= window
    strided = (j % stride == 0) | (i == j)
    return torch.stack([local if h < n_heads // 2 else strided for h in range(n_heads)])  # [H,T,T] bool


class Block(nn.Module):
    def __init__(self, d, h, window, stride):
        super().__init__()
        self.h, self.window, self.stride = h, window, stride
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, return_attention=False):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / (D // self.h) ** 0.5
        s = s.masked_fill(~swa_mask(T, self.h, self.window, self.stride).to(x.device), float("-inf"))
        a = s.softmax(-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp(self.ln2(x))
        return (x, a) if return_attention else x


class HierarchicalMLM(nn.Module):
    def __init__(self, vocab_size, d_model=48, n_heads=4, n_layers=2, n_ctx=64, window=3, stride=8):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, window, stride) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size)

    def embed(self, x):
        return self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))

    def forward(self, x, return_attention=False):
        h, atts = self.embed(x), []
        for b in self.blocks:
            h, a = b(h, return_attention=True)
            atts.append(a)
        logits = self.head(self.norm(h))
        return (logits, atts) if return_attention else logits
