"""Hugging Face folders (the `hf` kind): tiny random GPT-2, Llama (grouped-query attention) and GPT-NeoX models
made with transformers and saved with save_pretrained beside an offline-trained tokenizer. The converted model
computes the Hugging Face model's logits, the report's loss is the model's own loss, token strings read as text,
Trainer run folders and model ids in the local cache resolve offline, and bad folders end in one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hf_models import CORPUS, FAMILIES, hf_logits, hf_loss, make_hf_folder
from reportgen.cli import main
from reportgen.checkpoints import make_ref
from reportgen.config import BuildOptions
from reportgen.kinds import discover, hf, sniff_kind
from test_hostile_inputs import refused


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_folder(f, root, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def notes(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("notes") / "notes.txt"
    p.write_text(CORPUS * 3, encoding="utf-8")
    return p


def subject(folder: Path, **kw):
    return hf.load_subject(make_ref(folder), BuildOptions(ckpts=[str(folder)], data="notes.txt", **kw), "cpu")


def build(*args):
    return CliRunner().invoke(main, ["build", "-q", "--format", "html", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_computes_the_hf_logits(folders, family):
    folder = folders[family]
    assert sniff_kind(folder) == "hf"
    s = subject(folder)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (s.model(x) - hf_logits(folder, x)).abs().max().item()
    assert delta <= 1e-4
    assert s.causal
    assert s.model.cfg.original_architecture == json.loads((folder / "config.json").read_text())["architectures"][0]
    if family == "llama":  # grouped-query attention, and a 131072-token context run with buffers for 2048
        assert s.model.cfg.n_key_value_heads == 2 and s.model.cfg.n_heads == 4
        assert ("n_ctx", "131072 (run up to 2048)", "config.json") in s.config_rows


def test_folder_name_does_not_choose_the_architecture(tmp_path):
    """TransformerLens takes any path containing 'llama' for a Llama: a GPT-2 fine-tune called so still loads."""
    folder = make_hf_folder("gpt2", tmp_path, name="llama-distilled-gpt2")
    s = subject(folder)
    assert s.model.cfg.original_architecture == "GPT2LMHeadModel"
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (s.model(x) - hf_logits(folder, x)).abs().max().item() <= 1e-4


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    folder = make_hf_folder("gpt_neox", tmp_path, safe=False)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (subject(folder).model(x) - hf_logits(folder, x)).abs().max().item() <= 1e-4


def test_report_loss_is_the_models_own_loss(folders, notes, tmp_path):
    """End to end, as a user runs it: every LM analysis, and the loss the report states equals the loss the
    Hugging Face model computes on the same tokens."""
    out = tmp_path / "site"
    folder = folders["llama"]
    r = subprocess.run([sys.executable, "-m", "reportgen", "build", "-q", "--ckpt", str(folder), "--data", str(notes),
                        "--seq-len", "32", "--param", "token_map.layer=1", "--param", "token_map.grid_size=8",
                        "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr
    rep = out / folder.parent.name / "Llama-3.2-tiny"
    html = (rep / "index.html").read_text()
    for sec in ("predictions", "attention", "gradient-flow", "token-map"):
        assert f'id="{sec}"' in html
    assert "LlamaForCausalLM" in html and (rep / "report.pdf").is_file()
    meta = json.loads((rep / "data" / "report.json").read_text())
    assert meta["kind"] == "hf" and meta["model"]["architecture"] == "LlamaForCausalLM"
    assert meta["versions"]["transformers"]
    tr = np.load(rep / "data" / "trace.npz")
    tokens = torch.from_numpy(tr["tokens"][:meta["dataset"]["sequences"]])
    assert meta["metrics"]["loss"]["value"] == pytest.approx(hf_loss(folder, tokens), abs=1e-4)
    # the text went through the folder's tokenizer: its ids are the tokenizer's
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(notes.read_text(), add_special_tokens=False)["input_ids"]
    assert tr["tokens"][0].tolist() == ids[:32]


def test_token_strings_read_as_text(folders):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(folders["gpt2"])
    v = hf.readable_vocab(gpt2, 384)
    assert len(v) == 384 and v[-1] == "#383"  # ids past the tokenizer: shown as ids
    text = " the quick brown fox jumps over the lazy dog"
    ids = gpt2(text, add_special_tokens=False)["input_ids"]
    assert "".join(v[i] for i in ids) == text  # Ġ read as a space, pieces as their text
    assert v[gpt2.convert_tokens_to_ids("<|endoftext|>")] == "<|endoftext|>"
    assert v[gpt2.convert_tokens_to_ids("Ã")] == "\\xc3"  # a lone UTF-8 lead byte is shown as that byte
    assert "é" in {v[i] for i in gpt2("café", add_special_tokens=False)["input_ids"]} or " café" in v
    llama = AutoTokenizer.from_pretrained(folders["llama"])
    v = hf.readable_vocab(llama, 400)
    assert v[llama.convert_tokens_to_ids("<0x0A>")] == "\n"  # byte-fallback tokens as their bytes
    assert v[llama.convert_tokens_to_ids("<0xE2>")] == "\\xe2"
    assert v[llama.convert_tokens_to_ids("<s>")] == "<s>"
    words = [t for t in llama.get_vocab() if t.startswith("\u2581") and len(t) > 2]
    assert words and v[llama.convert_tokens_to_ids(words[0])] == " " + words[0][1:]  # ▁ read as a space


def test_trainer_run_folder(tmp_path, notes):
    """output_dir/checkpoint-N folders (optimizer state beside the weights, the tokenizer in output_dir)."""
    run = tmp_path / "my-run"
    for i, step in enumerate((10, 20)):
        c = make_hf_folder("gpt2", run, seed=i, name=f"checkpoint-{step}", tokenizer=False)
        (c / "optimizer.pt").write_bytes(b"adam state")
        (c / "trainer_state.json").write_text("{}")
    FAMILIES["gpt2"][1](FAMILIES["gpt2"][2]).save_pretrained(run)
    refs = discover([str(run)])
    assert [(r.run, r.name, r.step) for r in refs] == [("my-run", "step_10", 10), ("my-run", "step_20", 20)]
    out = tmp_path / "site"
    args = ("--ckpt", run, "--data", notes, "--seq-len", "16", "--only", "predictions", "--out", out)
    assert build(*args).exit_code == 0
    assert (out / "my-run" / "step_10" / "index.html").is_file() and (out / "my-run" / "step_20" / "index.html").is_file()
    assert (out / "my-run" / "index.html").is_file()  # the run overview
    (run / "checkpoint-20" / "optimizer.pt").write_bytes(b"more adam state")  # not what the model computes
    r = CliRunner().invoke(main, ["build", "--format", "html", *map(str, args)])
    assert "0 report(s) built, 2 up to date" in r.output + r.stderr
    tj = run / "tokenizer.json"  # the tokenizer the reports read, from the run folder: a change rebuilds both
    tj.write_text(json.dumps(json.loads(tj.read_text()), indent=1))
    r = CliRunner().invoke(main, ["build", "--format", "html", *map(str, args)])
    assert "2 report(s) built, 0 up to date" in r.output + r.stderr


def cache_repo(hub: Path, repo: str, files: dict[str, Path], rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A repository in the Hugging Face cache layout: blobs, snapshots/<rev>/<file> symlinked to them, refs/main."""
    base = hub / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    for rel, src in files.items():
        blob = base / "blobs" / f"{abs(hash((repo, rel))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    return snap


def test_model_id_resolves_in_the_local_cache_only(folders, notes, tmp_path):
    home = tmp_path / "hfhome"
    cache_repo(home / "hub", "tiny-org/tiny-gpt2", {q.name: q for q in folders["gpt2"].iterdir()})
    env = {**os.environ, "HF_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = tmp_path / "site"
    cmd = [sys.executable, "-m", "reportgen", "build", "-q", "--format", "html", "--data", str(notes), "--seq-len", "16",
           "--only", "predictions", "--out", str(out)]
    r = subprocess.run(cmd + ["--ckpt", "tiny-org/tiny-gpt2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "tiny-org--tiny-gpt2" / "0123456789ab" / "index.html").is_file()
    r = subprocess.run(cmd + ["--ckpt", "tiny-org/not-downloaded"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tiny-org/not-downloaded" in r.stderr


def test_bfloat16(folders, notes, tmp_path):
    s = subject(folders["gpt_neox"], dtype="bfloat16")
    assert {p.dtype for p in s.model.parameters()} == {torch.bfloat16} and s.dtype == "bfloat16"
    out = tmp_path / "site"
    for dt in ("float32", "bfloat16"):  # bfloat16 with every analysis (gradient flow runs with gradients enabled)
        only = ["--only", "predictions"] if dt == "float32" else []
        r = build("--ckpt", folders["gpt_neox"], "--data", notes, "--seq-len", "16", *only, "--dtype", dt,
                  "--out", out / dt)
        assert r.exit_code == 0, r.output
    m = {dt: json.loads((out / dt / folders["gpt_neox"].parent.name / "pythia-tiny" / "data" / "report.json").read_text())
         for dt in ("float32", "bfloat16")}
    assert m["bfloat16"]["compute"]["dtype"] == "bfloat16"
    assert m["bfloat16"]["metrics"]["loss"]["value"] == pytest.approx(m["float32"]["metrics"]["loss"]["value"], abs=0.05)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_weights_with_float32_arithmetic(folders, family):
    """On a CPU without native bfloat16 matmul the probe keeps the weights in bfloat16 and computes in float32
    (models/halfcompute.py): the logits are float32, at least as close to the float32 model's as bfloat16
    arithmetic gets, a run from a layer chains exactly, and afterwards the model is as it was."""
    from reportgen.models.halfcompute import float32_compute

    s32, s16 = subject(folders[family]), subject(folders[family], dtype="bfloat16")
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, plain = s32.model(x), s16.model(x).float()
        with float32_compute(s16.model):
            mixed = s16.model(x)
            chained = s16.model(s16.model(x, stop_at_layer=1), start_at_layer=1)
            assert {p.dtype for p in s16.model.parameters()} == {torch.bfloat16}  # between forwards
        again = s16.model(x).float()
    assert mixed.dtype == torch.float32 and torch.equal(chained, mixed)
    assert (mixed - ref).abs().max() <= (plain - ref).abs().max() + 1e-6 and (mixed - ref).abs().max() < 0.05
    assert torch.equal(again, plain) and s16.model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in s16.model.parameters()} == {torch.bfloat16}


def test_sae_from_a_release_folder_in_the_hf_cache(folders, notes, tmp_path):
    """An SAELens release as the Hugging Face cache stores it (files symlinked to blobs), its cfg.json in the
    keys SAELens wrote before 6.0."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    saved = tmp_path / "saved"
    sae.save_model(str(saved))
    cfg = json.loads((saved / "cfg.json").read_text())
    old = {"architecture": "standard", "d_in": 32, "d_sae": 64, "dtype": "float32", "device": "cpu",
           "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0, "model_name": "tiny-gpt2",
           "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True), "normalize_activations": "none",
           "context_size": 16, "dataset_path": "", "prepend_bos": False}
    (saved / "cfg.json").write_text(json.dumps(old))
    snap = cache_repo(tmp_path / "hub", "someone/tiny-gpt2-res", {f"blocks.0.hook_resid_pre/{q.name}": q for q in saved.iterdir()})
    out = tmp_path / "site"
    r = build("--ckpt", folders["gpt2"], "--data", notes, "--seq-len", "16", "--only", "sae_features", "--sae",
              snap / "blocks.0.hook_resid_pre", "--param", "sae_features.n_features=4", "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / folders["gpt2"].parent.name / "tiny-gpt2" / "data" / "report.json").read_text())
    assert meta["sae"]["hook"] == "blocks.0.hook_resid_pre" and meta["sae"]["d_sae"] == 64
    assert {"sae_l0", "sae_explained_variance"} <= set(meta["metrics"])


# ---------------------------------------------------------------- bad folders: one line, exit 2, nothing written


def broken(tmp_path, family="gpt2", **edit) -> Path:
    folder = make_hf_folder(family, tmp_path, name=f"broken-{family}")
    if edit:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(edit)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unconvertible_architecture_suggests_an_adapter(tmp_path, notes):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    folder = tmp_path / "bigcode"
    GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=1, vocab_size=384, n_positions=64)).save_pretrained(folder)
    FAMILIES["gpt2"][1](360).save_pretrained(folder)
    refused(["--ckpt", folder, "--data", notes], tmp_path / "site", r"bigcode/config\.json: .*GPTBigCodeForCausalLM.*--adapter")
    unknown = broken(tmp_path, model_type="my_own_lm", architectures=["MyOwnLM"])
    refused(["--ckpt", unknown, "--data", notes], tmp_path / "site", r"config\.json: .*MyOwnLM.*--adapter")


def test_bad_folders(tmp_path, notes):
    site = tmp_path / "site"
    no_tok = make_hf_folder("gpt2", tmp_path, name="no-tokenizer", tokenizer=False)
    refused(["--ckpt", no_tok, "--data", notes], site, r"no-tokenizer: no tokenizer")
    wrong = broken(tmp_path, n_embd=64)
    refused(["--ckpt", wrong, "--data", notes], site, r"broken-gpt2: config\.json does not match the weights")
    cut = make_hf_folder("gpt_neox", tmp_path, name="truncated")
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    refused(["--ckpt", cut, "--data", notes], site, r"truncated: cannot (load|read) the weights")
    no_w = make_hf_folder("gpt2", tmp_path, name="no-weights")
    (no_w / "model.safetensors").unlink()
    refused(["--ckpt", no_w, "--data", notes], site, r"no-weights: no weights")
    bad_json = make_hf_folder("gpt2", tmp_path, name="bad-json")
    (bad_json / "config.json").write_text("{not json")
    refused(["--ckpt", bad_json, "--data", notes], site, r"bad-json/config\.json: not a readable JSON config")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/reportgen-hf-pwned",))


def test_pickled_code_in_pytorch_model_bin_is_refused(tmp_path, notes):
    folder = make_hf_folder("gpt2", tmp_path, name="pickled", safe=False)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd["boom"] = Boom()
    torch.save(sd, folder / "pytorch_model.bin")
    Path("/tmp/reportgen-hf-pwned").unlink(missing_ok=True)
    refused(["--ckpt", folder, "--data", notes], tmp_path / "site", r"pickled: cannot (load|read) the weights")
    assert not Path("/tmp/reportgen-hf-pwned").exists()


def test_a_file_of_no_kind_names_the_kinds(tmp_path, notes):
    d = tmp_path / "stuff"
    d.mkdir()
    torch.save({"weights": torch.zeros(3)}, d / "model.pt")
    line = refused(["--ckpt", d, "--data", notes], tmp_path / "site", r"model\.pt: not a checkpoint reportgen knows")
    assert "Hugging Face model folders" in line and "--adapter" in line
    assert sniff_kind(d) == "unknown"
