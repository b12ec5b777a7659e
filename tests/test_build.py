"""`reportgen build` end to end on tiny checkpoints: the report, its files, the site, and bad input."""
from __future__ import annotations

import json
import os
import pickle
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import UPSTREAM, needs_upstream, make_model, save_upstream, write_dataset
from reportgen.cli import main


def build(*args, cwd=None):
    return CliRunner().invoke(main, ["build", "-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    """One full build (HTML + PDF) of the first tiny checkpoint; shared by the report checks below."""
    out = tmp_path_factory.mktemp("site")
    r = build("--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--out", out, "--samples", 3)
    assert r.exit_code == 0, r.output
    return out, out / "tiny-run" / "step_100"


def test_report_folder_layout(site):
    out, rep = site
    assert (out / "index.html").is_file() and (out / "manifest.json").is_file() and (out / ".nojekyll").is_file()
    for f in ("index.html", "report.pdf", "data/trace.npz", "data/report.json", "data/sudoku_latents.json",
              "data/step_evolution.json", "data/solving_stats.json"):
        assert (rep / f).is_file(), f
    figs = sorted(p.name for p in (rep / "figures").iterdir())
    assert "01-sudoku_latents-1.svg" in figs and "01-sudoku_latents-3.png" in figs
    assert "02-step_evolution-3.svg" in figs and "03-solving_stats-4.png" in figs
    assert all(re.fullmatch(r"\d\d-[a-z_]+-\d+\.(svg|png)", f) for f in figs)
    assert not [p for p in rep.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_html_has_every_section_figure_and_provenance(site):
    out, rep = site
    html = (rep / "index.html").read_text()
    for anchor in ("provenance", "sudoku-latents", "step-evolution", "solving-stats", "halting", "recursion",
                   "configuration", "data", "cite"):
        assert f'id="{anchor}"' in html, anchor
    srcs = re.findall(r'<img src="([^"]+)"', html)
    # latents 3 (samples), step evolution 3, solving statistics 5, halting 1, recursion 3
    assert len(srcs) == 3 + 3 + 5 + 1 + 3 and all(s.endswith(".svg") and (rep / s).is_file() for s in srcs)
    numbers = [int(n) for n in re.findall(r"Figure (\d+)\.</span>", html)]
    assert numbers == list(range(1, 16))
    meta = json.loads((rep / "data/report.json").read_text())
    assert meta["checkpoint"]["sha256"] in html and meta["checkpoint"]["sha256"] == __import__("hashlib").sha256(
        Path(meta["checkpoint"]["path"]).read_bytes()).hexdigest()
    assert "@misc{" in html and "hidden_size" in html
    # every link is relative and resolves inside the site
    for href in re.findall(r'(?:href|src)="([^"#]+)"', html):
        assert not re.match(r"[a-z]+:", href) and not href.startswith("/"), href
        assert (rep / href).resolve().exists(), href
    assert "<script" not in html


def test_exported_data_matches_trace(site):
    _, rep = site
    with np.load(rep / "data/trace.npz") as z:
        preds, q_halt, T = z["preds"], z["q_halt"], z["preds"].shape[0]
    ev = json.loads((rep / "data/step_evolution.json").read_text())
    assert ev["steps"] == T == 3
    for i, s in enumerate(ev["samples"]):
        assert [st["preds"] for st in s["steps"]] == preds[:, i].tolist()
        assert [st["q_halt"] for st in s["steps"]] == pytest.approx(q_halt[:, i].tolist())
    # the statistics are over the evaluation set (the whole split of 12), the trace holds the 3 drawn puzzles
    st = json.loads((rep / "data/solving_stats.json").read_text())
    with np.load(rep / "data/eval.npz") as e, np.load(rep / "data/trace.npz") as z:
        assert e["puzzle_index"].tolist() == list(range(12)) and z["puzzle_index"].tolist() == [0, 1, 2]
        acc, cells = e["correct_last"][e["blank"]].mean(), int(e["blank"].sum())
        assert np.array_equal(e["correct_last"][:3], z["preds"][-1] == z["labels"])
    assert st["per_step"][-1]["blank_accuracy"]["value"] == pytest.approx(acc)
    assert st["per_step"][-1]["blank_accuracy"]["n"] == cells and st["puzzles"] == 12


def test_pdf_opens_with_pages_and_bookmarks(site):
    import pypdf

    _, rep = site
    pdf = pypdf.PdfReader(rep / "report.pdf")
    assert len(pdf.pages) >= 3
    def flat(items):
        for o in items:
            yield from flat(o) if isinstance(o, list) else [o.title]

    titles = list(flat(pdf.outline))
    assert any("Latent panels" in t for t in titles) and any("Solving statistics" in t for t in titles)
    text = "".join(p.extract_text() for p in pdf.pages)
    assert "Figure 10." in text and "1 / " in text  # numbering and page numbers


def test_site_index_and_manifest_keep_every_report(site, tiny_run):
    out, _ = site
    r = build("--ckpt", tiny_run["run"] / "step_200", "--data", tiny_run["data"], "--out", out, "--samples", 2,
              "--format", "html")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert [(m["run"], m["name"]) for m in man["reports"]] == [("tiny-run", "step_100"), ("tiny-run", "step_200")]
    assert (out / "tiny-run/step_100/report.pdf").is_file()  # building step_200 did not touch step_100
    index = (out / "index.html").read_text()
    assert 'href="tiny-run/step_100/index.html"' in index and 'href="tiny-run/step_200/index.html"' in index
    assert "report.pdf" not in man["reports"][1]["files"]
    m = man["reports"][0]["metrics"]
    st = json.loads((out / "tiny-run/step_100/data/solving_stats.json").read_text())
    assert m["blank_accuracy"] == st["summary"]["blank_accuracy"]
    assert f"{100 * m['blank_accuracy']['value']:.1f}%" in index and f"(n={m['blank_accuracy']['n']})" in index
    summary = (out / "summary.md").read_text().splitlines()
    assert "### tiny-run" in summary and summary[summary.index("### tiny-run") + 2].startswith("| checkpoint | blank-cell acc. |")
    rows = [ln for ln in summary if ln.startswith("| [step_")]
    assert len(rows) == 2 and rows[0].startswith("| [step_100](tiny-run/step_100/index.html) |")
    from reportgen.stats import fmt

    assert f"| {fmt(m['blank_accuracy'], 'pct')} |" in rows[0] and "(n=" in rows[0]
    assert (out / "404.html").is_file() and "Not found" in (out / "404.html").read_text()


def test_default_data_from_config_and_options(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run["root"])  # all_config.yaml data_paths is relative to the project root
    out = tmp_path / "o"
    r = build("--ckpt", tiny_run["run"] / "step_200", "--out", out, "--samples", 4, "--select", "random", "--seed", 3,
              "--only", "solving_stats", "--format", "html", "--param", "solving_stats.calibration_bins=5")
    assert r.exit_code == 0, r.output
    rep = out / "tiny-run" / "step_200"
    meta = json.loads((rep / "data/report.json").read_text())
    assert meta["dataset"]["found_by"] == "all_config.yaml data_paths"
    idx = meta["dataset"]["puzzle_indices"]
    assert len(idx) == 4 and idx == sorted(idx) and idx != [0, 1, 2, 3]
    assert meta["analyses"] == ["solving_stats"] and not (rep / "data/sudoku_latents.json").exists()
    assert len(json.loads((rep / "data/solving_stats.json").read_text())["calibration"]["bins"]) == 5
    assert not (rep / "report.pdf").exists()


@needs_upstream
def test_upstream_run_folder_builds(tmp_path):
    """The real upstream checkpoint + dataset, found through all_config.yaml from the run folder."""
    r = build("--ckpt", UPSTREAM / "checkpoints/pretrain_att_sudoku_mini", "--out", tmp_path, "--samples", 2,
              "--format", "html")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "pretrain_att_sudoku_mini/step_400/data/report.json").read_text())
    assert meta["step"] == 400 and meta["compute"]["act_steps"] == 4


# --- bad input: one line naming the file, exit 2, nothing half-written -------------------------------------

def bad(args, out, match):
    r = CliRunner().invoke(main, ["build", "-q", "--out", str(out), "--format", "html", *map(str, args)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reportgen: error: "), r.stderr
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def good(tmp_path):
    data = write_dataset(tmp_path / "data")
    ckpt = save_upstream(make_model(0), tmp_path / "run", 5, str(data))
    return ckpt, data


def test_error_missing_checkpoint(tmp_path):
    bad(["--ckpt", tmp_path / "nope/step_1"], tmp_path / "o", r"nope/step_1: checkpoint not found")
    assert not (tmp_path / "o").exists()


def test_error_not_a_checkpoint_file(good, tmp_path):
    _, data = good
    junk = tmp_path / "run" / "step_9"
    junk.write_bytes(b"this is not a checkpoint")
    bad(["--ckpt", junk, "--data", data], tmp_path / "o", r"step_9: not a readable PyTorch checkpoint")


def test_error_not_a_trm_state_dict(good, tmp_path):
    _, data = good
    other = tmp_path / "run" / "step_8"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    bad(["--ckpt", other, "--data", data], tmp_path / "o", r"step_8: not a checkpoint reportgen knows \(TRM, ")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_error_pickle_refused_by_weights_only(good, tmp_path, capfd):
    _, data = good
    evil = tmp_path / "run" / "step_7"
    torch.save({"x": Evil()}, evil, pickle_module=pickle)
    bad(["--ckpt", evil, "--data", data], tmp_path / "o", r"step_7: refused to load: .*weights_only=True")
    assert "pwned" not in capfd.readouterr().out


def test_error_shapes_do_not_match_config(good, tmp_path):
    ckpt, data = good
    cfg = ckpt.parent / "all_config.yaml"
    cfg.write_text(cfg.read_text().replace("hidden_size: 32", "hidden_size: 48").replace("puzzle_emb_ndim: 32", "puzzle_emb_ndim: 48"))
    bad(["--ckpt", ckpt, "--data", data], tmp_path / "o", r"step_5: tensor \S+ has shape \[\d+(, \d+)*\] but all_config.yaml")


def test_error_dataset_missing_files(good, tmp_path):
    ckpt, data = good
    (data / "test" / "all__labels.npy").unlink()
    bad(["--ckpt", ckpt, "--data", data], tmp_path / "o", r"test/all__labels\.npy: missing")


def test_error_samples_larger_than_split(good, tmp_path):
    ckpt, data = good
    bad(["--ckpt", ckpt, "--data", data, "--samples", 500], tmp_path / "o", r"--samples 500 is larger than the split \(12 puzzles\)")


def test_error_bad_options(good, tmp_path):
    ckpt, data = good
    bad(["--ckpt", ckpt, "--data", data, "--only", "nope"], tmp_path / "o", r"--only: unknown analysis nope")
    bad(["--ckpt", ckpt, "--data", data, "--param", "sudoku_latents.method=l2"], tmp_path / "o", r"method must be dot or cosine")
    bad(["--ckpt", ckpt, "--data", tmp_path / "nodata"], tmp_path / "o", r"nodata: dataset folder not found")


def test_failed_build_keeps_the_previous_report(good, tmp_path):
    ckpt, data = good
    out = tmp_path / "o"
    assert build("--ckpt", ckpt, "--data", data, "--out", out, "--format", "html", "--samples", 2).exit_code == 0
    rep = out / "run" / "step_5"
    before = (rep / "index.html").read_bytes()
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated file
    bad(["--ckpt", ckpt, "--data", data], out, r"step_5: not a readable PyTorch checkpoint")
    assert (rep / "index.html").read_bytes() == before
    assert [p.name for p in rep.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_killed_build_leaves_the_previous_report_whole(good, tmp_path):
    """SIGKILL while the new report is being written: the old report stays complete and in place, and the
    next build removes the orphaned staging folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ckpt, data = good
    out = tmp_path / "o"
    assert build("--ckpt", ckpt, "--data", data, "--out", out, "--samples", 2, "--format", "html").exit_code == 0
    rep = out / "run" / "step_5"
    before = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "reportgen", "build", "-q", "--ckpt", str(ckpt), "--data", str(data),
                             "--out", str(out), "--samples", "3", "--force"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:  # wait until the new report is half written
        staged = [p for p in rep.parent.glob(".step_5.tmp-*") if (p / "figures").is_dir() and any((p / "figures").iterdir())]
        if staged:
            break
        time.sleep(0.005)
    assert staged, "the build finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = {p.relative_to(rep): p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    assert after == before  # the old report, whole
    assert build("--ckpt", ckpt, "--data", data, "--out", out, "--samples", 2, "--format", "html").exit_code == 0
    assert [p.name for p in rep.parent.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_stops_at_once_and_keeps_every_report_whole(good, tmp_path):
    """SIGINT to the process group (Ctrl-C) while a PDF is being laid out: exit 130 with one line, the render
    worker is stopped, the reports not yet installed are dropped and every report folder is whole."""
    import os
    import signal
    import subprocess
    import sys

    ckpt, data = good
    for step in (6, 7):
        save_upstream(make_model(step), ckpt.parent, step, str(data), write_config=False)
    out = tmp_path / "o"
    assert build("--ckpt", ckpt.parent, "--data", data, "--out", out, "--samples", 2).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "reportgen", "build", "--ckpt", str(ckpt.parent), "--data", str(data),
                             "--out", str(out), "--samples", "3"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:  # step_5 is handed to the render worker, step_6 is being probed
        lines.append(line)
        if line.startswith("[2/3]"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(lines) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("reportgen: interrupted")
    run = out / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_5", "step_6", "step_7"]
    for rep in run.glob("step_*"):
        meta = json.loads((rep / "data" / "report.json").read_text())
        assert all((rep / f).is_file() for f in meta["files"]) and "report.pdf" in meta["files"]
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert build("--ckpt", ckpt.parent, "--data", data, "--out", out, "--samples", 3).exit_code == 0


def test_same_inputs_same_bytes(site, tiny_run, tmp_path):
    """A second build of the same checkpoint into another folder writes byte-identical files, PDF included."""
    out, rep = site
    r = build("--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--out", tmp_path, "--samples", 3)
    assert r.exit_code == 0, r.output
    again = tmp_path / "tiny-run" / "step_100"
    files = sorted(p.relative_to(rep) for p in rep.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    differ = [str(f) for f in files if (rep / f).read_bytes() != (again / f).read_bytes()]
    assert differ == []  # built in another folder, through other temporary names: nothing depends on them


def test_a_failing_checkpoint_keeps_the_reports_before_it_listed(good, tmp_path):
    ckpt, data = good
    broken = ckpt.parent / "step_9"
    broken.write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "o"
    line = bad(["--ckpt", ckpt.parent, "--data", data, "--samples", 2], out, r"step_9: not a readable PyTorch checkpoint")
    assert "corrupt or truncated" in line
    man = json.loads((out / "manifest.json").read_text())
    assert [r["name"] for r in man["reports"]] == ["step_5"]
    assert not (out / "run" / "step_9").exists()


def test_python_api_builds_like_the_cli(tiny_run, tmp_path):
    import reportgen

    folders = reportgen.build(tiny_run["run"] / "step_100", out=tmp_path, data=str(tiny_run["data"]), samples=2,
                              formats=["html"], quiet=True)
    assert folders == [tmp_path / "tiny-run" / "step_100"]
    assert (folders[0] / "index.html").is_file() and (tmp_path / "manifest.json").is_file()
    # a training loop calls it again: the name must still be the function after the engine was imported
    assert reportgen.build(tiny_run["run"] / "step_200", out=tmp_path, data=str(tiny_run["data"]), samples=2,
                           formats=["html"], quiet=True) == [tmp_path / "tiny-run" / "step_200"]


def test_python_api_leaves_the_garbage_collector_as_it_was(tiny_run, tmp_path):
    """A build pauses the cyclic collector while it loads and freezes what it loaded; a process that goes on after
    reportgen.build (a training loop, a notebook) gets its collector back as it was, also after a failed build."""
    import gc

    import reportgen
    from reportgen.errors import ReportgenError

    gc.unfreeze()  # what a CLI build run in this test process (CliRunner) left frozen
    assert gc.isenabled()
    reportgen.build(tiny_run["run"] / "step_100", out=tmp_path, data=str(tiny_run["data"]), samples=2,
                    formats=["html"], quiet=True, force=True)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ReportgenError):  # fails while gathering, after the collector was paused
        reportgen.build(tiny_run["run"] / "step_100", out=tmp_path / "b", data=str(tmp_path / "missing"), quiet=True)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()  # a process that turned it off itself keeps it off
    try:
        reportgen.build(tiny_run["run"] / "step_100", out=tmp_path, data=str(tiny_run["data"]), samples=2,
                        formats=["html"], quiet=True, force=True)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_build_command_keeps_freed_memory_for_the_next_batch():
    """The build and watch commands tune glibc's allocator so that a block freed by one batch serves the next
    (a fresh process otherwise maps and page-faults each batch's logits and codes anew); watch hands it back
    between builds; MALLOC_* variables win."""
    code = """if True:
        import os, sys
        from reportgen.heap import release_freed_memory, reuse_freed_memory
        print(reuse_freed_memory() if sys.argv[1] == "1" else False)
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        before = rss()
        b = b"x" * (48 << 20)  # glibc maps a block above 32 MiB apart and unmaps it when freed
        del b
        print(rss() - before)
        release_freed_memory()
        print(rss() - before)"""
    run = lambda flag, env=None: subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,  # noqa: E731
                                                check=True, env={**os.environ, **(env or {})}).stdout.split()
    on, kept, released = run("1")
    assert on == "True" and int(kept) > 40 << 20 and int(released) < 8 << 20  # kept for reuse, then handed back
    off, kept, _ = run("0")
    assert off == "False" and int(kept) < 8 << 20  # glibc's default handed it back at once
    assert run("1", {"MALLOC_ARENA_MAX": "2"})[0] == "False"


def test_compiled_templates_are_reused_and_follow_their_source(tmp_path, monkeypatch):
    """Compiled templates are cached across processes (a new environment loads them), and a template edited
    since (e.g. in --templates DIR) is compiled again."""
    import jinja2

    from reportgen import render as R

    monkeypatch.setattr(R, "_OVERRIDE", [str(tmp_path)])
    page = tmp_path / "x.html"
    page.write_text("one {{ 1|num }}")
    R._environment.cache_clear()
    env = R.environment()
    cache = env.bytecode_cache
    assert cache is not None and env.get_template("x.html").render() == "one 1"
    R._environment.cache_clear()
    env2 = R.environment()
    loaded = []
    real = jinja2.FileSystemBytecodeCache.load_bytecode
    monkeypatch.setattr(jinja2.FileSystemBytecodeCache, "load_bytecode",
                        lambda self, b: (real(self, b), loaded.append(b.code is not None)))
    assert env2.get_template("x.html").render() == "one 1" and loaded == [True]
    page.write_text("two {{ 2|num }}")
    R._environment.cache_clear()
    assert R.environment().get_template("x.html").render() == "two 2"
    for f in Path(cache.directory).glob("__reportgen_*"):  # a damaged entry is compiled again
        f.write_bytes(f.read_bytes()[:40])
    R._environment.cache_clear()
    assert R.environment().get_template("x.html").render() == "two 2"
    R._environment.cache_clear()


def test_data_json_is_json_dumps_with_shared_parts_written_once():
    """An analysis's data file holds the same text as json.dumps, also where a block appears twice (an SAE
    section's first SAE at the top level and in `saes`), and still refuses NaN."""
    from reportgen.writer import data_json

    cards = [{"id": i, "a": [np.float32(0.5) * i, 1.25], "t": ["x", "\u2028é"]} for i in range(3000)]
    block = {"features": cards, "l0": 3.5, "hook": "blocks.0.hook_resid_post", "keys": {1: "int key"}}
    data = {**block, "saes": [block, {**block, "features": cards[:5]}], "n": None, "ok": True}
    want = json.dumps(data, separators=(",", ":"), default=lambda o: o.item())
    assert len(want) > 1 << 16 and data_json(data) == want + "\n"
    assert json.loads(data_json({"a": cards[:1], "b": cards[:1]}))["b"] == json.loads(json.dumps(cards[:1], default=lambda o: o.item()))
    with pytest.raises(ValueError):
        data_json({**data, "bad": [float("nan")]})


def test_figure_pdfs_for_latex_embed_truetype_fonts(tiny_run, tmp_path):
    import pypdf

    r = build("--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--out", tmp_path, "--samples", 2,
              "--format", "html", "--figure-formats", "svg,png,pdf", "--only", "sudoku_latents,solving_stats")
    assert r.exit_code == 0, r.output
    rep = tmp_path / "tiny-run" / "step_100"
    pdfs = sorted((rep / "figures").glob("*.pdf"))
    assert [p.stem for p in pdfs] == sorted(p.stem for p in (rep / "figures").glob("*.svg"))
    meta = json.loads((rep / "data/report.json").read_text())
    assert all(f"figures/{p.name}" in meta["files"] for p in pdfs)
    assert f'href="figures/{pdfs[0].name}"' in (rep / "index.html").read_text()
    for p in (pdfs[0], pdfs[-1]):  # a board (drawn by reportgen) and a matplotlib chart
        page = pypdf.PdfReader(p).pages[0]
        fonts = [f.get_object() for f in page["/Resources"]["/Font"].values()]
        assert fonts and all(f["/Subtype"] != "/Type3" for f in fonts)
        assert all("/FontFile2" in (f.get("/FontDescriptor") or f["/DescendantFonts"][0].get_object()["/FontDescriptor"]).get_object()
                   for f in fonts)  # TrueType font programs embedded
        assert page.extract_text().strip()


def test_self_contained_report_references_nothing_outside_itself(tiny_run, tmp_path):
    r = build("--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--out", tmp_path, "--samples", 2,
              "--format", "html", "--self-contained")
    assert r.exit_code == 0, r.output
    rep = tmp_path / "tiny-run" / "step_100"
    page = (rep / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert refs and all(ref.startswith(("data:", "#")) for ref in refs), [x[:40] for x in refs if not x.startswith(("data:", "#"))]
    assert page.count('src="data:image/svg+xml;base64,') == len(list((rep / "figures").glob("*.svg")))
    assert "<script" not in page and "report.html" in json.loads((rep / "data/report.json").read_text())["files"]
    # the site's own page keeps its links to the figure files and data
    assert 'href="data/trace.npz"' in (rep / "index.html").read_text()


def test_unchanged_checkpoints_are_not_rebuilt(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    args = ["--data", tiny_run["data"], "--out", tmp_path / "o", "--samples", 2, "--format", "html"]
    stamp = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "o" / "run").glob("step_*/**/*") if p.is_file()}  # noqa: E731

    def run_build(*extra):
        r = CliRunner().invoke(main, ["build", "--ckpt", str(run), *map(str, args), *extra])
        assert r.exit_code == 0, r.output
        return r.stderr

    run_build()
    first = stamp()
    log = run_build()
    assert "0 report(s) built, 2 up to date" in log and stamp() == first  # the cache answered: nothing rewritten
    save_upstream(make_model(9), run, 300, "data/tiny-sudoku", write_config=False)  # a new checkpoint appears
    log = run_build()
    assert "1 report(s) built, 2 up to date" in log and "up to date: " + str(tmp_path / "o" / "run" / "step_300") not in log
    assert {p: t for p, t in stamp().items() if "step_300" not in str(p)} == first
    # options of another kind and parameters of analyses a TRM report does not run change nothing in it
    assert "0 report(s) built, 3 up to date" in run_build("--mask-rate", "0.3", "--mask-id", "3", "--max-seqs", "9",
                                                        "--param", "token_map.grid_size=7")
    assert "0 report(s) built, 3 up to date" in run_build("--only", "sudoku_latents,step_evolution,solving_stats,halting,recursion",
                                                        "--param", "attention.max_tokens=8")
    assert "3 report(s) built, 0 up to date" in run_build("--param", "solving_stats.calibration_bins=5")
    assert "3 report(s) built, 0 up to date" in run_build("--samples", "3")  # a changed option rebuilds
    assert "3 report(s) built, 0 up to date" in run_build("--samples", "3", "--force")
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [r["name"] for r in man["reports"]] == ["step_100", "step_200", "step_300"]


def test_parallel_jobs_write_the_same_site(tiny_run, tmp_path):
    args = ["--ckpt", tiny_run["run"], "--data", tiny_run["data"], "--samples", 2, "--format", "html"]
    assert build(*args, "--out", tmp_path / "one").exit_code == 0
    r = build(*args, "--out", tmp_path / "two", "--jobs", 2)
    assert r.exit_code == 0, r.output
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len([p for p in one if p.name == "index.html"]) == 4  # site, run overview, 2 reports
    assert all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in one)


def test_parallel_jobs_write_the_same_pdfs(tiny_run, tmp_path):
    """--jobs 2 with PDFs, figure PDFs and self-contained pages: the site is byte-identical to a --jobs 1
    build's (each process lays out its own PDFs)."""
    args = ["--ckpt", tiny_run["run"], "--data", tiny_run["data"], "--samples", 2, "--figure-formats", "svg,png,pdf"]
    assert build(*args, "--out", tmp_path / "one").exit_code == 0
    r = build(*args, "--out", tmp_path / "two", "--jobs", 2, "--self-contained")
    assert r.exit_code == 0, r.output
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert sorted(set(two) - set(one)) == [Path("tiny-run/step_100/report.html"), Path("tiny-run/step_200/report.html")]
    assert len([p for p in one if p.name == "report.pdf"]) == 2 and Path("tiny-run/overview.pdf") in one
    assert len([p for p in one if p.suffix == ".pdf" and p.parent.name == "figures"]) > 10
    differ = [str(p) for p in one if (tmp_path / "one" / p).read_bytes() != (tmp_path / "two" / p).read_bytes()]
    # only what lists the files and the cache key (--self-contained is an input)
    assert differ == ["manifest.json", str(Path("tiny-run/data/overview.json"))] + [
        str(Path(f"tiny-run/step_{n}/data/report.json")) for n in (100, 200)]
    assert "data:image/svg+xml" in (tmp_path / "two" / "tiny-run" / "step_200" / "report.html").read_text()


@pytest.mark.parametrize("formats", ["html", "html,pdf"])
def test_parallel_jobs_report_a_failing_checkpoint_in_one_line(good, tmp_path, formats):
    ckpt, data = good
    save_upstream(make_model(3), ckpt.parent, 6, str(data), write_config=False)
    (ckpt.parent / "step_9").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "o"
    bad(["--ckpt", ckpt.parent, "--data", data, "--samples", 2, "--jobs", 2, "--format", formats], out,
        r"step_9: not a readable PyTorch checkpoint")
    reports = json.loads((out / "manifest.json").read_text())["reports"]
    assert [r["name"] for r in reports] == ["step_5", "step_6"]
    assert all(("report.pdf" in r["files"]) == ("pdf" in formats) for r in reports)
    assert all((out / r["path"] / f).is_file() for r in reports for f in r["files"])


def test_submitit_executor_builds_one_job_per_checkpoint(tiny_run, tmp_path):
    """--executor local runs the same jobs the SLURM path submits (through submitit's LocalExecutor)."""
    pytest.importorskip("submitit")
    args = ["--ckpt", tiny_run["run"], "--data", tiny_run["data"], "--samples", 2, "--format", "html"]
    assert build(*args, "--out", tmp_path / "one").exit_code == 0
    r = build(*args, "--out", tmp_path / "two", "--executor", "local", "--slurm-cpus", 1)
    assert r.exit_code == 0, r.output
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in one)
    logs = tmp_path / ".two-submitit"
    assert len(list(logs.glob("*/*_result.pkl"))) == 2  # one job per checkpoint, logs beside --out, not in it
    # a failing checkpoint: its job's error comes back as one line; the other report is still listed
    (tiny_run["run"].parent / "bad").mkdir(exist_ok=True)
    bad_ckpt = tiny_run["run"].parent / "bad" / "step_1"
    bad_ckpt.write_bytes(b"PK\x03\x04 truncated")
    r = build("--ckpt", bad_ckpt, "--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--samples", 2,
              "--format", "html", "--out", tmp_path / "three", "--executor", "local", "--slurm-cpus", 1)
    assert r.exit_code == 2 and "step_1: not a readable PyTorch checkpoint" in r.output


def test_run_overview_matches_the_reports(tiny_run, tmp_path):
    r = build("--ckpt", tiny_run["run"], "--data", tiny_run["data"], "--out", tmp_path, "--samples", 3, "--format", "html")
    assert r.exit_code == 0, r.output
    run = tmp_path / "tiny-run"
    overview = json.loads((run / "data/overview.json").read_text())
    assert [(x["name"], x["step"]) for x in overview["reports"]] == [("step_100", 100), ("step_200", 200)]
    for x in overview["reports"]:
        assert x["metrics"] == json.loads((run / x["name"] / "data/report.json").read_text())["metrics"]
    html = (run / "index.html").read_text()
    assert 'href="step_100/index.html"' in html and 'href="../index.html"' in html
    assert (run / "figures/trend-metrics.svg").is_file()
    boards = (run / "figures/trend-sudoku_latents.svg").read_text()
    assert ">step_100<" in boards and ">step_200<" in boards  # one row per checkpoint
    assert 'href="tiny-run/index.html"' in (tmp_path / "index.html").read_text()
    assert not (run / "overview.pdf").exists()  # --format html: no PDFs


def test_run_overview_also_as_pdf(tiny_run, tmp_path):
    from pypdf import PdfReader

    args = ["--ckpt", tiny_run["run"] / "step_100", "--data", tiny_run["data"], "--samples", 2, "--out", tmp_path]
    assert build(*args).exit_code == 0
    run = tmp_path / "tiny-run"
    text = "".join(page.extract_text() for page in PdfReader(run / "overview.pdf").pages)
    # a narrow header column breaks "blank-cell acc." after its hyphen or at its space
    text = re.sub(r"\s+", " ", re.sub(r"-\s+", "-", text))
    assert "step_100" in text and "blank-cell acc." in text, text
    assert 'href="overview.pdf"' in (run / "index.html").read_text()
    assert build(*args, "--format", "html", "--force").exit_code == 0  # an HTML-only rebuild drops the stale PDF
    assert not (run / "overview.pdf").exists() and 'href="overview.pdf"' not in (run / "index.html").read_text()


def test_run_figure_picks_the_most_improved_common_puzzle():
    from analyses import sudoku_latents

    def data(accs):
        return {"samples": [dict(puzzle_index=p, blank_accuracy=a, solved=a == 1.0, inputs=[1] * 81, labels=[2] * 81,
                                 preds=[2] * 81, confidence=[1.0] * 81, z_H_tokens=[2] * 81, z_L_tokens=[1] * 81)
                            for p, a in accs.items()]}

    f = sudoku_latents.run_figure([("a", data({3: 0.1, 5: 0.5, 8: 0.2})), ("b", data({3: 0.9, 5: 0.6, 9: 1.0}))])
    assert f.caption.startswith("Puzzle 3 ")  # 8 and 9 are not in both; 3 rose by 0.8, 5 by 0.1
    assert sudoku_latents.run_figure([("a", data({1: 0.5})), ("b", data({2: 0.5}))]) is None
