"""reportgen.callbacks: reports built in the background from inside real training loops (a plain loop, Lightning,
the Hugging Face Trainer), each build a real `python -m reportgen build` process."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import hierarchical_copy, make_model, save_upstream, write_dataset
from reportgen.callbacks import Every

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(formats=["html"], eval="4", samples=2, threads=1)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def report(out: Path, run: str, name: str) -> dict:
    return json.loads((out / run / name / "data" / "report.json").read_text())


def test_due_steps():
    hook = Every(1000, out="unused")
    assert [s for s in (1, 999, 1000, 1500, 2000, 2001) if hook.due(s)] == [1000, 2000]
    hook = Every(1000, out="unused")
    assert [s for s in (700, 1400, 2100, 2800) if hook.due(s)] == [1400, 2100]  # passed a multiple since the last
    hook.close()


def test_unknown_build_option_is_named():
    with pytest.raises(TypeError, match="no option colour"):
        Every(10, out="site", colour="red")


def test_plain_loop_builds_in_the_background_one_at_a_time(tmp_path, capfd):
    """hook.save in a loop: steps 2, 4, 6 are due; 2 starts building, 4 waits, 6 replaces 4 (the newest is built);
    then a corrupt file handed to hook(step, path) ends in its one error line. close() waits for all of it."""
    write_dataset(tmp_path / "data" / "tiny")
    run = tmp_path / "run"
    save_upstream(make_model(0), run, 0, str(tmp_path / "data" / "tiny"))  # all_config.yaml for the run
    (run / "step_0").unlink()
    out = tmp_path / "site"
    hook = Every(2, out=out, **FAST)
    saved, busy = [], []
    for step in range(1, 7):
        model = make_model(step)
        saved.append(hook.save(step, {"_orig_mod.model.inner." + k: v for k, v in model.state_dict().items()}, run))
        busy.append(hook.busy)
    assert [p.name if p else None for p in saved] == [None, "step_2.pt", None, "step_4.pt", None, "step_6.pt"]
    assert busy[1:] == [True] * 5  # the loop went on while step 2 was still building
    assert [r.step for r in hook.wait()] == [2, 6]
    bad = run / "step_8.pt"
    bad.write_bytes(b"\x80\x04 not a checkpoint")
    assert hook(7, bad) is False and hook(8, bad) is True
    results = hook.close()
    assert [(r.step, r.returncode) for r in results] == [(2, 0), (6, 0), (8, 2)], [r.error for r in results]
    assert "--ckpt" in results[0].argv and str(run / "step_2.pt") in results[0].argv
    assert report(out, "run", "step_2")["step"] == 2 and report(out, "run", "step_6")["step"] == 6
    assert not (out / "run" / "step_4").exists()
    assert "step_8.pt" in results[2].error and "\n" not in results[2].error
    err = capfd.readouterr().err
    assert f"not building {run / 'step_4.pt'}: a newer checkpoint ({run / 'step_6.pt'}) is queued" in err
    assert f"reportgen: report of {bad} failed: {results[2].error}" in err
    assert f"reportgen: report of {run / 'step_2.pt'} built in" in err
    assert json.loads((out / "run" / "data" / "overview.json").read_text())["reports"][-1]["name"] == "step_6"


# ---------------------------------------------------------------- Lightning

@pytest.fixture
def adapted(tmp_path):
    """The hierarchical example's model and adapter, with a vocabulary and evaluation text."""
    with hierarchical_copy(tmp_path, TEXT) as vocab:
        yield tmp_path, vocab


def lightning_module(vocab_size: int, times: list):
    import lightning as L

    from model import HierarchicalMLM

    class Tiny(L.LightningModule):
        def __init__(self, d_model=16, n_heads=4, n_layers=2, n_ctx=32):
            super().__init__()
            self.save_hyperparameters()  # -> the checkpoint's hyper_parameters, which the adapter builds from
            self.model = HierarchicalMLM(vocab_size, d_model, n_heads, n_layers, n_ctx)

        def training_step(self, batch, batch_idx):
            times.append(time.perf_counter())
            (x,) = batch
            logits = self.model(x)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def loader(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, vocab_size, (32, 32), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


def trainer(root: Path, cb, **kw):
    import lightning as L

    return L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=[cb, *kw.pop("more", [])], **kw)


def test_lightning_builds_every_n_steps_without_blocking_training(adapted):
    from reportgen.callbacks import Lightning

    root, vocab = adapted
    out = root / "site"
    cb = Lightning(every=2, out=out, adapter=str(root / "adapter.py"), data=str(root / "eval.txt"), seq_len=32,
                   only=["predictions"], **FAST)
    times: list = []
    trainer(root, cb, enable_checkpointing=False).fit(lightning_module(len(vocab), times), loader(len(vocab)))
    results = cb.hook.results
    assert [(r.step, r.returncode) for r in results] == [(2, 0), (4, 0)], [r.error for r in results]
    for step in (2, 4):
        assert (root / "checkpoints" / f"checkpoint-{step}.ckpt").is_file()
        meta = report(out, "checkpoints", f"step_{step}")
        assert meta["kind"] == "adapter" and meta["step"] == step
    assert len(times) == 4 and times[-1] < results[0].finished  # steps 3 and 4 ran while step 2's report was built
    ratio = cb.seconds / results[0].seconds
    assert ratio < 0.25, (cb.seconds, results[0].seconds)  # the hooks (saving included) cost a fraction of a build


def test_lightning_reuses_the_file_a_model_checkpoint_saved(adapted):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from reportgen.callbacks import Lightning

    root, vocab = adapted
    out = root / "site"
    mc = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=4, save_top_k=-1)
    cb = Lightning(every=2, out=out, adapter=str(root / "adapter.py"), data=str(root / "eval.txt"), seq_len=32,
                   only=["predictions"], **FAST)
    trainer(root, cb, more=[mc]).fit(lightning_module(len(vocab), []), loader(len(vocab)))
    results = cb.hook.results
    assert [r.path for r in results] == [root / "checkpoints" / "checkpoint-2.ckpt", root / "ckpts" / "epoch=0-step=4.ckpt"]
    assert all(r.returncode == 0 for r in results), [r.error for r in results]
    assert not (root / "checkpoints" / "checkpoint-4.ckpt").exists()  # not saved twice
    assert report(out, "ckpts", "step_4")["step"] == 4


# ---------------------------------------------------------------- Hugging Face Trainer

def test_huggingface_builds_each_saved_checkpoint_folder(tmp_path):
    """A real Trainer saving checkpoint-1 and checkpoint-2 folders (weights, config, tokenizer, optimizer state):
    each is built with its folder as --ckpt, by the hf kind, into one run of two reports."""
    transformers = pytest.importorskip("transformers")
    from hf_models import CORPUS, byte_level_tokenizer
    from reportgen.callbacks import HuggingFace

    tok = byte_level_tokenizer(300)
    tok.pad_token = tok.eos_token  # the default collator pads (the sequences here are all 32 tokens)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = tok(CORPUS, add_special_tokens=False)["input_ids"]
    data = [{"input_ids": torch.tensor(ids[i:i + 32]), "labels": torch.tensor(ids[i:i + 32])} for i in range(0, 256, 32)]
    (tmp_path / "val.txt").write_text(CORPUS, encoding="utf-8")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf-run"), max_steps=2, save_steps=1,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    out = tmp_path / "site"
    cb = HuggingFace(out=out, data=str(tmp_path / "val.txt"), seq_len=16, only=["predictions"], **FAST)
    transformers.Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb]).train()
    results = cb.hook.results  # the end of training waited for both
    assert [r.step for r in results] == [1, 2]
    for r in results:
        folder = tmp_path / "hf-run" / f"checkpoint-{r.step}"
        assert (folder / "optimizer.pt").is_file()  # Trainer state beside the model, not read as a checkpoint
        assert r.path == folder and r.argv[r.argv.index("--ckpt") + 1] == str(folder)
        assert r.returncode == 0, r.error
        meta = report(out, "hf-run", f"step_{r.step}")
        assert meta["kind"] == "hf" and meta["step"] == r.step


def test_huggingface_every_n(tmp_path):
    transformers = pytest.importorskip("transformers")
    from reportgen.callbacks import HuggingFace

    cb = HuggingFace(every=2, out=tmp_path / "site", **FAST)
    assert isinstance(cb, transformers.TrainerCallback)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    state = transformers.TrainerState(global_step=1)
    (tmp_path / "o" / "checkpoint-1").mkdir(parents=True)
    cb.on_save(args, state, transformers.TrainerControl())
    assert not cb.hook.busy  # step 1 is not a multiple of 2
    cb.hook.close()


def test_lightning_falls_back_to_pytorch_lightning():
    """Where only the `pytorch_lightning` package exists (here: `lightning` made unimportable in a fresh process),
    the callback is a pytorch_lightning Callback."""
    import os
    import subprocess

    pytest.importorskip("pytorch_lightning")
    code = ("import sys; sys.modules['lightning'] = None\n"
            "from reportgen.callbacks import Lightning\n"
            "import pytorch_lightning as pl\n"
            "cb = Lightning(every=2, out='site')\n"
            "print(isinstance(cb, pl.Callback), 'lightning.pytorch' in sys.modules)\n"
            "cb.hook.close()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], r.stdout + r.stderr
