"""--adapter: the user's own PyTorch model (examples/hierarchical) through the HookedTransformer-like facade."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import hierarchical_copy

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "hierarchical"
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def run(tmp_path):
    """A copy of the example's adapter and model with a vocabulary and two tiny random checkpoints."""
    with hierarchical_copy(tmp_path, TEXT) as vocab:
        from model import HierarchicalMLM

        ck = tmp_path / "checkpoints"
        ck.mkdir()
        hp = dict(d_model=16, n_heads=4, n_layers=2, n_ctx=32)
        for s in (10, 20):
            torch.manual_seed(s)
            m = HierarchicalMLM(len(vocab), **hp)
            torch.save({"state_dict": {"model." + k: v for k, v in m.state_dict().items()}, "hyper_parameters": hp,
                        "global_step": s}, ck / f"checkpoint-{s}.ckpt")
        yield tmp_path


def cli(*args, cwd=None):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "reportgen", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_report_sections(run, tmp_path):
    out = tmp_path / "site"
    r = cli("build", "--ckpt", str(run / "checkpoints"), "--adapter", str(run / "adapter.py"), "--data",
            str(run / "eval.txt"), "--out", str(out), "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    page = (out / "checkpoints" / "step_20" / "index.html").read_text()
    for anchor in ("predictions", "attention", "gradient-flow", "token-map"):
        assert f'id="{anchor}"' in page
    meta = json.loads((out / "checkpoints" / "step_20" / "data" / "report.json").read_text())
    assert meta["kind"] == "adapter" and meta["step"] == 20
    assert "block 1" in page.split('id="gradient-flow"')[1]  # the user's parameters grouped by declared blocks


def test_facade_matches_model(run):
    from reportgen.models.adapted import load_adapted

    facade, a = load_adapted(str(run / "adapter.py"), run / "checkpoints" / "checkpoint-10.ckpt", "cpu")
    x = torch.randint(0, facade.cfg.d_vocab, (3, 32))
    with torch.no_grad():
        own_logits, own_att = a.model(x, return_attention=True)
        assert torch.allclose(facade(x), own_logits)
        chained = facade(facade(x, stop_at_layer=0), start_at_layer=0)
        assert torch.allclose(chained, own_logits, atol=1e-5)
        got = {}
        facade.run_with_hooks(x, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", lambda p, hook: got.__setitem__(hook.name, p))
                                            for i in range(2)])
    for i in range(2):
        assert torch.equal(got[f"blocks.{i}.attn.hook_pattern"], own_att[i])
    names = [n for n, _ in facade.named_parameters()]
    assert "blocks.0.qkv.weight" in names and "unembed.weight" in names


def _bad(run, body):
    (run / "bad.py").write_text("from reportgen.adapter import Adapted\nimport torch\n" + body)
    return cli("build", "--ckpt", str(run / "checkpoints"), "--adapter", str(run / "bad.py"), "--data",
               str(run / "eval.txt"), "--out", str(run / "site"))


@pytest.mark.parametrize("body,words", [
    ("def adapter(path, device):\n    raise RuntimeError('boom')\n", "raised RuntimeError"),
    ("def adapter(path, device):\n    m = torch.nn.Linear(4, 4)\n    return Adapted(model=m, n_heads=1, n_ctx=8, logits=lambda x: torch.zeros(2, 3))\n", "shape"),
])
def test_bad_adapter_one_line(run, body, words):
    r = _bad(run, body)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if "error" in ln]  # besides the [i/n] progress lines
    assert len(lines) == 1 and "bad.py" in lines[0] and words in lines[0], r.stderr
    assert not (run / "site" / "checkpoints").exists()


def test_missing_adapter_file(run):
    r = cli("build", "--ckpt", str(run / "checkpoints"), "--adapter", str(run / "nope.py"), "--data",
            str(run / "eval.txt"), "--out", str(run / "site"))
    assert r.returncode == 2 and "nope.py" in r.stderr and "error" in r.stderr.strip().splitlines()[-1]


def test_toml_adapter_and_unmet_need_is_a_note(run):
    src = (run / "adapter.py").read_text().replace("attention=lambda x: model(x, return_attention=True), ", "")
    (run / "noatt.py").write_text(src)
    (run / "reportgen.toml").write_text('[model]\nadapter = "noatt.py"\n')
    r = cli("build", "--ckpt", str(run / "checkpoints" / "checkpoint-10.ckpt"), "--config", str(run / "reportgen.toml"),
            "--data", str(run / "eval.txt"), "--out", str(run / "site"), "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    page = (run / "site" / "checkpoints" / "step_10" / "index.html").read_text()
    assert 'id="attention"' not in page and "is left out: the adapter declares no attention" in page
    assert 'id="predictions"' in page


def test_shipped_example_report_shows_training(tmp_path):
    """The committed example, built as its README says (from its folder): three step reports, and the
    trained model restores masked characters better at the last step than at the first."""
    ex = tmp_path / "hierarchical"
    shutil.copytree(EX, ex, ignore=shutil.ignore_patterns("__pycache__", "site"))
    steps = sorted(int(p.stem.split("-")[1]) for p in (ex / "checkpoints" / "hierarchical-mlm").glob("checkpoint-*.ckpt"))
    assert len(steps) == 3
    r = cli("build", "--ckpt", "checkpoints/hierarchical-mlm/", "--adapter", "adapter.py", "--data", "eval.txt", "--out",
            "site", cwd=ex)
    assert r.returncode == 0, r.stderr
    run = ex / "site" / "hierarchical-mlm"
    assert sorted(p.name for p in run.glob("step_*")) == sorted(f"step_{s}" for s in steps)
    metrics = {s: json.loads((run / f"step_{s}" / "data" / "report.json").read_text())["metrics"] for s in steps}
    first, last = metrics[steps[0]], metrics[steps[-1]]
    assert last["loss"]["value"] < first["loss"]["value"] - 0.3
    assert last["masked_accuracy"]["value"] > 0.75 > first["masked_accuracy"]["value"]
    pred = json.loads((run / f"step_{steps[-1]}" / "data" / "predictions.json").read_text())
    assert pred["task"] == "masked" and pred["seq_len"] == 64 and pred["accuracy"]["value"] == last["masked_accuracy"]["value"]
    page = (run / f"step_{steps[-1]}" / "index.html").read_text()
    for anchor in ("predictions", "attention", "gradient-flow", "token-map"):
        assert f'id="{anchor}"' in page


class _Sneaky:  # a pickled object whose unpickling would run code
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "never-written",))


def test_load_checkpoint_formats(tmp_path):
    """Lightning's own .ckpt (written by a real Trainer), a plain state dict and {model_state_dict, config} load
    as (state dict, hyper-parameters); a checkpoint that carries code is refused without running it."""
    from reportgen.adapter import load_checkpoint

    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self, width=3):
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Linear(width, 2)

        def training_step(self, batch, i):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    m = Module(width=3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(m, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    sd, hp = load_checkpoint(tmp_path / "last.ckpt")
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], m.model.weight.detach())
    assert hp == {"width": 3}

    torch.save(m.model.state_dict(), tmp_path / "plain.pt")
    sd, hp = load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(sd["bias"], m.model.bias.detach()) and hp == {}

    torch.save({"model_state_dict": m.model.state_dict(), "config": {"width": 3}}, tmp_path / "dict.pt")
    assert load_checkpoint(tmp_path / "dict.pt")[1] == {"width": 3}

    torch.save({"state_dict": m.model.state_dict(), "extra": _Sneaky()}, tmp_path / "sneaky.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_checkpoint(tmp_path / "sneaky.pt")
    assert not (Path(__file__).parent / "never-written").exists()


def test_module_function_adapter_and_its_files_in_the_digest(run, tmp_path):
    """--adapter module:function imports an installed (here: on PYTHONPATH) module; with an adapter FILE.py, editing
    the model.py beside it rebuilds the report, and an unchanged one is up to date."""
    (run / "hier_adapters.py").write_text("from adapter import adapter as _a\n\n\ndef make(path, device):\n"
                                          "    return _a(path, device)\n")
    ck = str(run / "checkpoints" / "checkpoint-10.ckpt")
    env = {"PYTHONPATH": f"{ROOT}:{run}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    common = ["--data", str(run / "eval.txt"), "--seq-len", "32", "--only", "predictions"]
    r = subprocess.run([sys.executable, "-m", "reportgen", "build", "--ckpt", ck, "--adapter", "hier_adapters:make",
                        "--out", str(tmp_path / "mod"), *common], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "mod" / "checkpoints" / "step_10" / "data" / "report.json").read_text())
    assert meta["kind"] == "adapter" and meta["metrics"]

    def build():
        return cli("build", "--ckpt", ck, "--adapter", str(run / "adapter.py"), "--out", str(tmp_path / "file"), *common)

    assert build().returncode == 0
    assert "0 report(s) built, 1 up to date" in build().stderr
    with open(run / "model.py", "a") as f:
        f.write("\n# edited\n")
    r = build()
    assert r.returncode == 0 and "1 report(s) built, 0 up to date" in r.stderr, r.stderr
