"""Tiny random Hugging Face model folders, made the way users' folders are made: `transformers` models from the
configs in tests/data/hf/ saved with `save_pretrained`, beside a tokenizer trained offline with `tokenizers`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "data" / "hf"
CORPUS = ("The quick brown fox jumps over the lazy dog. A naïve café owner in Zürich sells crème brûlée — "
          "and 東京 tea for 3€.\n" + "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
          "        self.x = x\n        self.y = y\n") * 8


def byte_level_tokenizer(vocab_size: int):
    """A GPT-2 style tokenizer: byte-level BPE (the space marker Ġ), one end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def sentencepiece_tokenizer(vocab_size: int):
    """A Llama-2 style tokenizer: BPE over ▁-marked words with byte fallback (<0xE2> tokens), <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


FAMILIES = {  # name: (config file, tokenizer maker, tokenizer vocabulary, folder name)
    "gpt2": ("gpt2.json", byte_level_tokenizer, 360, "tiny-gpt2"),
    "llama": ("llama.json", sentencepiece_tokenizer, 400, "Llama-3.2-tiny"),  # a name TransformerLens would misread
    "gpt_neox": ("gpt_neox.json", byte_level_tokenizer, 384, "pythia-tiny"),
    "qwen2": ("qwen2.json", byte_level_tokenizer, 360, "Qwen2.5-tiny"),
    "phi": ("phi.json", byte_level_tokenizer, 360, "phi-tiny"),  # partial rotary: config.rope_parameters in transformers 5
    "opt": ("opt.json", byte_level_tokenizer, 360, "opt-tiny"),
}


def make_hf_folder(family: str, root: Path, seed: int = 0, name: str | None = None, tokenizer: bool = True,
                   safe: bool = True) -> Path:
    """root/<name>/: config.json, model weights (safetensors, or pytorch_model.bin with safe=False), tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file, make_tok, n_tok, default = FAMILIES[family]
    folder = root / (name or default)
    raw = json.loads((CONFIGS / cfg_file).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    config.architectures = raw["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the initialiser's 0.02 so that predictions differ from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if not safe:  # the format transformers wrote before safetensors: a torch.save'd state dict
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if tokenizer:
        make_tok(n_tok).save_pretrained(folder)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(tokens.long()).logits


def hf_loss(folder: Path, tokens: torch.Tensor) -> float:
    """The Hugging Face model's own next-token loss (labels = inputs), mean over every predicted position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        tokens = tokens.long()
        return float(model(tokens, labels=tokens).loss)
