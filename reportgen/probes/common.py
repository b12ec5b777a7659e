"""Small helpers both probes of a language model use (the pass and the SAE part)."""
from __future__ import annotations

import re


def layer_of(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


def loss_terms(logits, targets, scored):
    """(cross-entropy per scored position [n] float32, top-1 hits there) from one batch's logits."""
    import torch

    lg = logits[scored].float()  # [n, V]
    t = targets[scored]
    ce = torch.logsumexp(lg, -1) - lg.gather(-1, t[:, None]).squeeze(-1)
    return ce, int((lg.argmax(-1) == t).sum().item())
