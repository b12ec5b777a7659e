"""`reportgen watch RUN_DIR`: real tiny TRM checkpoints appearing in a run folder, built by a real watch process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import make_model, save_upstream, write_dataset
from reportgen.watch import Watcher, is_candidate

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--format", "html", "--eval", "4", "--samples", "2", "--threads", "1")


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def watch(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "reportgen", "watch", *map(str, args)], cwd=kw.get("cwd"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_json(out: Path, run: str, name: str) -> Path:
    return out / run / name / "data" / "report.json"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with a dataset and a run folder: two good checkpoints, a corrupt one, copies under hidden and
    temporary names, and beside them a file that keeps growing while the watch runs."""
    root = tmp_path_factory.mktemp("watchproj")
    write_dataset(root / "data" / "tiny")
    run = root / "run"
    for step, seed in ((100, 1), (200, 2)):
        save_upstream(make_model(seed), run, step, "data/tiny")
    (run / "step_150").write_bytes(b"PK\x03\x04 this is no torch archive" * 10)
    for name in (".step_400", "step_500.tmp", "step_600.partial", "step_700.part", "tmp-checkpoint-800",
                 "step_900.tmp-1234-ab12"):
        shutil.copy(run / "step_100", run / name)
    return root, run


@pytest.fixture(scope="module")
def once(project):
    """One `watch --once` while step_300 grows the whole time; then a second one over the same folder."""
    root, run = project
    growing = run / "step_300"
    stop = threading.Event()

    def grow():
        with open(growing, "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()
                stop.wait(0.02)

    t = threading.Thread(target=grow)
    t.start()
    try:
        p = watch("run", "--once", "--interval", "0.4", "--out", "site", *FAST, cwd=root)
        first = p.communicate(timeout=600) + (p.returncode,)
    finally:
        stop.set()
        t.join()
    growing.unlink()
    mtimes = {n: report_json(root / "site", "run", n).stat().st_mtime_ns for n in ("step_100", "step_200")}
    t0 = time.perf_counter()
    p = watch("run", "--once", "--interval", "0.2", "--out", "site", *FAST, cwd=root)
    second = p.communicate(timeout=600) + (p.returncode, time.perf_counter() - t0)
    return root, first, second, mtimes


def test_once_builds_the_complete_checkpoints_and_the_run_overview(once):
    root, (out, err, code), _, _ = once
    site = root / "site"
    for name in ("step_100", "step_200"):
        meta = json.loads(report_json(site, "run", name).read_text())
        assert meta["step"] == int(name.split("_")[1]) and (site / "run" / name / "index.html").is_file()
    overview = json.loads((site / "run" / "data" / "overview.json").read_text())
    assert [r["name"] for r in overview["reports"]] == ["step_100", "step_200"]
    assert (site / "run" / "index.html").is_file() and (site / "index.html").is_file()
    assert sorted(r["name"] for r in json.loads((site / "manifest.json").read_text())["reports"]) == ["step_100", "step_200"]


def test_hidden_and_temporary_names_are_never_built(once):
    root, (out, err, code), _, _ = once
    assert sorted(p.name for p in (root / "site" / "run").iterdir() if p.name.startswith("step_")) == ["step_100", "step_200"]
    for name in ("step_400", "step_500", "step_600", "step_700", "step_800", "step_900", "tmp-checkpoint-800"):
        assert name not in err


def test_a_growing_file_is_not_built_in_that_poll(once):
    root, (out, err, code), _, _ = once
    assert not (root / "site" / "run" / "step_300").exists()
    assert "not complete yet (still changing between polls): run/step_300" in err


def test_a_corrupt_checkpoint_is_one_error_line_and_the_others_build(once):
    root, (out, err, code), _, _ = once
    assert code == 2, err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "step_150" in errors[0] and "not a readable PyTorch checkpoint" in errors[0], err
    assert not (root / "site" / "run" / "step_150").exists()


def test_a_second_once_skips_what_is_up_to_date(once):
    root, _, (out, err, code, wall), mtimes = once
    assert code == 2  # step_150 is still corrupt
    assert err.count("up to date: site/run/step_") == 2 and "report(s) built" in err, err
    assert {n: report_json(root / "site", "run", n).stat().st_mtime_ns for n in mtimes} == mtimes  # not rewritten
    assert "0 report(s) built" in err and "1 report(s) built" not in err


def test_watching_builds_a_checkpoint_that_appears_and_ctrl_c_exits_0(project, tmp_path):
    """A checkpoint saved while the watch runs (written under a temporary name, then renamed, as trainers do) is
    built and the overview lists it; SIGINT then stops the watch with one line and exit 0."""
    root, run = project
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(run / "all_config.yaml", live / "all_config.yaml")
    p = watch(live, "--interval", "0.3", "--out", tmp_path / "site", "--data", root / "data" / "tiny", *FAST)
    try:
        line = p.stderr.readline()
        assert line.startswith(f"watching {live} every 0.3 s"), line
        shutil.copy(run / "step_200", live / "step_200.tmp")
        os.replace(live / "step_200.tmp", live / "step_200")
        overview = tmp_path / "site" / "live" / "data" / "overview.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if overview.is_file() and [r["name"] for r in json.loads(overview.read_text())["reports"]] == ["step_200"]:
                break
            time.sleep(0.05)  # waiting for the build, not a fixed delay
        assert report_json(tmp_path / "site", "live", "step_200").is_file(), p.stderr.read() if p.poll() is not None else ""
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert err.strip().splitlines()[-1] == f"stopped watching {live}"
    assert "Traceback" not in err


def test_completeness_takes_two_polls_with_the_same_size_and_mtime(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    f = run / "step_5"
    f.write_bytes(b"a" * 100)
    w = Watcher(run)
    assert w.poll() == ([], [f])  # first sight: not yet known to be complete
    with open(f, "ab") as fh:
        fh.write(b"b" * 100)  # still being written
    assert w.poll() == ([], [f])
    assert w.poll() == ([f], [])  # unchanged since the last poll
    w.mark(f)
    assert w.poll() == ([], [])  # built: not again
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten in place (e.g. last.ckpt): again when stable
    assert w.poll() == ([], [f]) and w.poll() == ([f], [])


def test_a_checkpoint_folder_is_complete_when_no_file_in_it_changes(tmp_path):
    run = tmp_path / "out"
    ck = run / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    w = Watcher(run)
    w.poll()
    (ck / "model.safetensors").write_bytes(b"0" * 10)  # the trainer is still writing the folder
    assert w.poll() == ([], [ck])
    (ck / ".model.safetensors.tmp").write_bytes(b"1")  # hidden files inside are not part of it
    assert w.poll() == ([ck], [])


@pytest.mark.parametrize("name,ok", [
    ("step_100", True), ("step_100.pt", True), ("checkpoint-8.ckpt", True), ("epoch=0-step=4.ckpt", True),
    ("best_model.pt", True), ("last.ckpt", True), ("all_config.yaml", False), ("vocab.json", False),
    (".step_100", False), ("step_100.tmp", False), ("step_100.pt.part", False), ("step_100.partial", False),
    ("step_100.pt.tmp-99-ab", False), ("tmp-checkpoint-8", False), ("tmp_step_1.pt", False), ("step_1.pt~", False),
])
def test_which_names_are_candidates(tmp_path, name, ok):
    (tmp_path / name).write_bytes(b"x")
    assert is_candidate(tmp_path / name) is ok


def test_bad_run_folder_and_bad_options_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, words in (((tmp_path / "file", "--once"), "not a folder"),
                        ((tmp_path / "missing", "--once"), "run folder not found"),
                        ((tmp_path, "--once", "--eval", "lots"), "--eval takes a number")):
        p = watch(*args, "--interval", "0", "--out", tmp_path / "site")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2 and err.count("\n") == 1 and words in err, err


def test_watch_and_callbacks_import_no_torch():
    code = ("import sys, reportgen.watch, reportgen.callbacks, reportgen.cli; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
