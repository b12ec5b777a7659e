"""reportgen adapter for model.py: `reportgen build --ckpt checkpoints/hierarchical-mlm/ --adapter adapter.py --data eval.txt`."""
import json
from pathlib import Path

from model import HierarchicalMLM
from reportgen.adapter import Adapted, load_checkpoint
from torch import nn


class Embed(nn.Module):  # tokens -> residual stream, as a module the facade can call
    def __init__(self, m):
        super().__init__()
        self.tok, self.pos = m.tok, m.pos

    def forward(self, x):
        return self.tok(x) + self.pos.weight[: x.shape[1]]


def adapter(checkpoint_path, device):
    sd, hp = load_checkpoint(checkpoint_path)
    vocab = json.loads((Path(__file__).parent / "vocab.json").read_text())
    model = HierarchicalMLM(len(vocab), **hp)
    model.load_state_dict(sd)
    model.embedder = Embed(model)
    return Adapted(model=model, n_heads=model.blocks[0].h, n_ctx=model.pos.num_embeddings, causal=False,
                   mask_id=vocab.index("[MASK]"), pad_id=vocab.index("[PAD]"), vocab=vocab, logits=model,
                   embed="embedder", blocks=[f"blocks.{i}" for i in range(len(model.blocks))],
                   final_norm="norm", unembed="head",
                   attention=lambda x: model(x, return_attention=True), config=hp)
