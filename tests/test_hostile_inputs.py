"""Inputs a new user really feeds `reportgen build`: each ends in one line naming the file or option, exit 2,
nothing half-written, other reports untouched; and the site a build writes is safe to publish and to share."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import EVAL_TEXT, make_lm, make_model, save_restoration, save_upstream, write_dataset
from reportgen.cli import main


def build(*args):
    return CliRunner().invoke(main, ["build", "-q", "--format", "html", *map(str, args)])


def tree(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes: what a failed build must leave as it was."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args, out: Path, match: str) -> str:
    """Run a build that must fail: exit 2, one line on stderr matching `match`, `out` exactly as before."""
    before = tree(out)
    r = build("--out", out, *args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reportgen: error: "), r.stderr
    assert re.search(match, lines[0]), lines[0]
    assert tree(out) == before  # nothing half-written, no report replaced, no temporary file left
    return lines[0]


@pytest.fixture
def proj(tmp_path):
    """A TRM run folder with one checkpoint, its dataset, and a site that already holds another run's report."""
    data = write_dataset(tmp_path / "data")
    ckpt = save_upstream(make_model(0), tmp_path / "run", 5, str(data))
    other = save_upstream(make_model(1), tmp_path / "other", 7, str(data))
    out = tmp_path / "site"
    assert build("--ckpt", other, "--data", data, "--out", out, "--samples", 2).exit_code == 0
    return ckpt, data, out


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("value,what", [(float("nan"), "1 NaN"), (float("inf"), "1 infinite")])
def test_nan_or_inf_in_trm_weights_names_the_tensor(proj, value, what):
    ckpt, data, out = proj
    sd = torch.load(ckpt, weights_only=True)
    key = next(k for k in sd if k.endswith("lm_head.weight"))
    sd[key][3, 1] = value
    torch.save(sd, ckpt)
    line = refused(["--ckpt", ckpt, "--data", data], out, rf"step_5: tensor {re.escape(key)} holds {what} value")
    assert str(ckpt) in line


def test_nan_in_language_model_weights_names_the_tensor(tmp_path):
    ckpt = save_restoration(make_lm(0), tmp_path / "lm" / "step_3.pt")
    obj = torch.load(ckpt, weights_only=True)
    obj["model_state_dict"]["layers.1.ff.0.weight"].view(-1)[:4] = float("nan")
    torch.save(obj, ckpt)
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    refused(["--ckpt", ckpt, "--data", text, "--seq-len", "32", "--only", "predictions"], tmp_path / "site",
            r"step_3\.pt: tensor layers\.1\.ff\.0\.weight holds 4 NaN value")


def test_transformer_lens_dict_may_keep_its_minus_inf_mask_value_but_not_nan(tmp_path):
    from reportgen.errors import ReportgenError
    from reportgen.models.lm import load_model, read_checkpoint
    from reportgen.models.restoration import to_hooked

    hooked = to_hooked(make_lm(2).state_dict(), make_lm(2).cfg)
    sd = hooked.state_dict()
    assert any(k.endswith("attn.IGNORE") and torch.isinf(v).all() for k, v in sd.items())  # TransformerLens' own
    p = tmp_path / "tl.pt"
    torch.save({"cfg": hooked.cfg.to_dict(), "state_dict": sd}, p)
    load_model(p, read_checkpoint(p), "transformer_lens", "cpu")  # loads: -inf there is by design
    sd["blocks.0.attn.W_Q"][0, 0, 0] = float("nan")
    torch.save({"cfg": hooked.cfg.to_dict(), "state_dict": sd}, p)
    with pytest.raises(ReportgenError, match=r"tl\.pt: tensor blocks\.0\.attn\.W_Q holds 1 NaN"):
        load_model(p, read_checkpoint(p), "transformer_lens", "cpu")


def resnet_like() -> dict:
    return {"conv1.weight": torch.randn(8, 3, 7, 7), "bn1.weight": torch.ones(8), "bn1.running_mean": torch.zeros(8),
            "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3), "fc.weight": torch.randn(10, 8), "fc.bias": torch.zeros(10)}


@pytest.mark.parametrize("payload", ["state_dict", "training_checkpoint"])
@pytest.mark.parametrize("with_data", [False, True])
def test_state_dict_of_an_unrelated_model_is_named_as_such(proj, tmp_path, payload, with_data):
    _, data, out = proj
    sd = resnet_like()
    obj = sd if payload == "state_dict" else {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3}
    p = tmp_path / "vision" / "resnet18.pth"
    p.parent.mkdir()
    torch.save(obj, p)
    refused(["--ckpt", p, *(["--data", data] if with_data else [])], out,
            r"resnet18\.pth: not a checkpoint reportgen knows \(TRM, seed-004 RestorationModel, TransformerLens(, [^)]*)?\); for your own model, pass --adapter FILE\.py$")


def test_two_checkpoints_that_would_share_a_report_folder(proj, tmp_path):
    ckpt, data, out = proj
    for run in ("exp 1", "exp-1"):
        save_upstream(make_model(2), tmp_path / run, 5, str(data))
    line = refused(["--ckpt", tmp_path / "exp 1", "--ckpt", tmp_path / "exp-1", "--data", data], out,
                   r"exp 1/step_5 and .*exp-1/step_5: both checkpoints would be written to the report folder exp-1/step_5")
    assert str(tmp_path / "exp 1" / "step_5") in line
    shutil.copy(ckpt, ckpt.with_name("step_5.pt"))  # the same step saved twice in one run folder
    refused(["--ckpt", ckpt.parent, "--data", data], out, r"step_5 and .*step_5\.pt: both checkpoints .* run/step_5")


def test_checkpoint_named_like_the_run_overview_files(proj, tmp_path):
    ckpt, data, out = proj
    shutil.copy(ckpt, ckpt.with_name("figures.pt"))
    refused(["--ckpt", ckpt.with_name("figures.pt"), "--data", data], out,
            r"figures\.pt: its report folder run/figures would be the run overview's figures")


# ------------------------------------------------------------------------------------------- config and data


def test_yaml_alias_bomb_in_all_config(proj):
    ckpt, data, out = proj
    cfg = ckpt.parent / "all_config.yaml"
    upstream = cfg.read_text()
    lines = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 6)]  # 9**6 values
    cfg.write_text(upstream + "\n".join(lines) + "\n")
    refused(["--ckpt", ckpt, "--data", data], out, r"all_config\.yaml: its YAML aliases expand to more than 100,000 values")
    cfg.write_text(upstream + "loop: &me [1, *me]\n")  # a list that holds itself
    refused(["--ckpt", ckpt, "--data", data], out, r"all_config\.yaml: its YAML aliases expand")


def test_zero_byte_npy_in_a_trm_dataset(proj):
    ckpt, data, out = proj
    (data / "test" / "all__labels.npy").write_bytes(b"")
    refused(["--ckpt", ckpt, "--data", data], out, r"test/all__labels\.npy: empty file, not a \.npy array")
    with open(data / "test" / "all__labels.npy", "wb") as f:  # a header that claims terabytes the file does not hold
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(80))
    refused(["--ckpt", ckpt, "--data", data], out, r"test/all__labels\.npy: not a readable \.npy array")


def test_zero_byte_npy_as_language_model_data(tmp_path):
    ckpt = save_restoration(make_lm(0), tmp_path / "lm" / "step_3.pt")
    empty = tmp_path / "tokens.npy"
    empty.write_bytes(b"")
    refused(["--ckpt", ckpt, "--data", empty, "--seq-len", "32"], tmp_path / "site",
            r"tokens\.npy: not a readable \.npy token array")
    empty = tmp_path / "tokens.pt"
    empty.write_bytes(b"")
    refused(["--ckpt", ckpt, "--data", empty, "--seq-len", "32"], tmp_path / "site", r"tokens\.pt: not a readable token tensor")


@pytest.mark.parametrize("field,value,what", [("inputs", 11, "token id 11"), ("labels", 40, "token id 40"),
                                              ("puzzle_identifiers", 3, "puzzle id 3")])
def test_dataset_ids_outside_the_checkpoint(proj, field, value, what):
    ckpt, data, out = proj
    path = data / "test" / f"all__{field}.npy"
    a = np.load(path)
    if a.ndim == 2:
        a[4, 17] = value
    else:
        a[4] = value
    np.save(path, a)
    refused(["--ckpt", ckpt, "--data", data], out, rf"test/all__{field}\.npy: {what} in row 4 is outside the checkpoint's 0\.\.")


# ------------------------------------------------------------------------------------------- output folder


def test_out_under_a_regular_file_fails_before_any_probe(proj, tmp_path):
    ckpt, data, _ = proj
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    refused(["--ckpt", ckpt, "--data", data], f / "site", rf"site: --out cannot be created: {re.escape(str(f))} is a file")
    refused(["--ckpt", ckpt, "--data", data], f, r"notes\.txt: --out is a file")
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_out_in_a_read_only_folder(proj, tmp_path):
    ckpt, data, _ = proj
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        refused(["--ckpt", ckpt, "--data", data], ro / "site", r"--out cannot be created: .*ro is not writable")
    finally:
        ro.chmod(0o755)


def modes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_site_files_are_readable_by_a_web_server(tmp_path):
    data = write_dataset(tmp_path / "data")
    ckpt = save_upstream(make_model(0), tmp_path / "run", 5, str(data))
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(main, ["build", "-q", "--ckpt", str(ckpt), "--data", str(data), "--out",
                                      str(tmp_path / "site"), "--samples", "2"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    m = modes(tmp_path / "site")
    for name in ("index.html", "manifest.json", "summary.md", "404.html", "run/index.html", "run/data/overview.json",
                 "run/overview.pdf", "run/step_5/index.html", "run/step_5/report.pdf"):
        assert m[name] == 0o644, (name, oct(m[name]))
    wrong = {k: oct(v) for k, v in m.items() if v != (0o755 if (tmp_path / "site" / k).is_dir() else 0o644)}
    assert wrong == {}


def test_overview_figures_are_renamed_into_place(proj):
    """A reader (a web server, a browser) that has a figure open keeps a whole file while a build replaces it."""
    ckpt, data, out = proj
    fig = out / "other" / "figures" / "trend-metrics.svg"
    assert fig.is_file()
    with open(fig, "rb") as reader:
        old = fig.read_bytes()
        ino = fig.stat().st_ino
        save_upstream(make_model(3), ckpt.parent.parent / "other", 9, str(data))
        assert build("--ckpt", ckpt.parent.parent / "other", "--data", data, "--out", out, "--samples", 2).exit_code == 0
        assert fig.stat().st_ino != ino and fig.read_bytes() != old  # a new file, renamed over the old one
        assert reader.read() == old  # the old one, whole
    assert [p.name for p in (out / "other").iterdir() if p.name.startswith(".")] == []


def test_a_concurrent_builds_temporary_files_are_left_alone(proj):
    """Another build writing the same run's overview PDF at the same time: its temporary file is not ours."""
    ckpt, data, out = proj
    theirs = out / "other" / ".overview.pdf.tmp"
    theirs.write_bytes(b"%PDF-1.7 another build's PDF, half written")
    r = CliRunner().invoke(main, ["build", "-q", "--ckpt", str(ckpt.parent.parent / "other"), "--data", str(data),
                                  "--out", str(out), "--samples", "2", "--force"])
    assert r.exit_code == 0, r.output
    assert theirs.read_bytes() == b"%PDF-1.7 another build's PDF, half written"
    assert (out / "other" / "overview.pdf").read_bytes().startswith(b"%PDF")
    from reportgen.site import temp_name

    names = {temp_name("overview.pdf") for _ in range(100)}
    assert len(names) == 100 and all(f"-{os.getpid()}-" in n for n in names)


# ------------------------------------------------------------------------------------------- --train-sae


def test_train_sae_leaves_no_temporary_folder_and_publishes_readable_files(tmp_path):
    run = tmp_path / "lm run"
    save_restoration(make_lm(0), run / "step_10.pt")
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def train(layer: int):
        return subprocess.run(
            [sys.executable, "-m", "reportgen", "build", "-q", "--ckpt", str(run), "--data", str(text), "--out",
             str(tmp_path / "site"), "--seq-len", "32", "--format", "html", "--only", "sae_features", "--train-sae",
             str(layer), "--sae-tokens", "2048"], capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022),
            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})

    r = train(7)  # the training fails: the model has layers 0..1
    assert r.returncode == 2 and "--train-sae 7: layer out of range" in r.stderr, r.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("reportgen-")] == []
    assert not (tmp_path / "site").exists()
    r = train(1)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("reportgen-")] == []
    m = modes(tmp_path / "site" / "lm-run" / "step_10" / "sae")  # SAELens writes its safetensors files 0600
    assert m.pop(".") == 0o755 and "sae_weights.safetensors" in m and set(m.values()) == {0o644}, m
