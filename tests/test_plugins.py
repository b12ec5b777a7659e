"""Third-party plugins: an analysis and a model kind from another installed package (entry points), and
--templates DIR overriding a shipped template. The plugin package is real: a module and a dist-info folder
with entry_points.txt on PYTHONPATH, as pip installs one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ANALYSIS = '''
"""A third-party TRM analysis: the share of blank cells of the drawn puzzles."""
from dataclasses import dataclass

NAME = "blank_share"
TITLE = "Blank share"
SUBJECTS = ("trm",)
METRICS = {"blank_share": ("blank share", "pct")}


@dataclass
class Params:
    scale: float = 1.0


def compute(trace, params):
    blank = (trace.inputs == 1).mean()
    return {"blank_share": float(blank) * params.scale, "puzzles": int(trace.inputs.shape[0])}


def metrics(data):
    return {"blank_share": data["blank_share"]}


def figures(data, params):
    return []
'''

KIND = '''
"""A third-party kind: claims files ending in .toykind (it runs no model; only detection is exercised)."""
from dataclasses import dataclass

NAME = "toy"
DESCRIPTION = "toy kind"
SUBJECT = "lm"


@dataclass
class Options:
    seed: int = 0


def sniff(path):
    return path.suffix == ".toykind"


def inputs(ref, opts):
    return []


def gather(job, opts, params, gc):
    from reportgen.errors import ReportgenError

    raise ReportgenError(f"{job.ref.path}: the toy kind gathers nothing")
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-packages")
    pkg = root / "rg_plugin"
    (pkg / "templates" / "partials").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "blank_share.py").write_text(ANALYSIS)
    (pkg / "toy.py").write_text(KIND)
    (pkg / "templates" / "partials" / "blank_share.html").write_text(
        "<p class=\"plugin\">Blank share {{ s.data.blank_share|pct }} of {{ s.data.puzzles }} puzzles.</p>\n")
    info = root / "rg_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rg-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [reportgen.analyses]
        blank_share = rg_plugin.blank_share

        [reportgen.kinds]
        toy = rg_plugin.toy
        """))
    return root


def run(args, plugin_path, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(Path(__file__).parent.parent)]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "reportgen", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_list_shows_plugin_analyses_and_kinds(plugin_path):
    r = run(["list"], plugin_path)
    assert r.returncode == 0, r.stderr
    assert "toy kind [rg_plugin.toy]" in r.stdout and "[rg_plugin.blank_share]" in r.stdout


def test_a_plugin_analysis_runs_in_a_report_with_its_own_partial(plugin_path, tiny_run, tmp_path):
    out = tmp_path / "site"
    r = run(["build", "-q", "--ckpt", str(tiny_run["run"] / "step_100"), "--data", str(tiny_run["data"]), "--out",
             str(out), "--only", "blank_share,solving_stats", "--samples", "2", "--format", "html",
             "--param", "blank_share.scale=2"], plugin_path)
    assert r.returncode == 0, r.stderr
    rep = next(out.glob("*/step_100"))
    html = (rep / "index.html").read_text()
    data = json.loads((rep / "data" / "blank_share.json").read_text())
    assert data["puzzles"] == 2 and 0 < data["blank_share"] <= 2
    assert '<p class="plugin">Blank share' in html
    meta = json.loads((rep / "data" / "report.json").read_text())
    assert meta["metrics"]["blank_share"] == data["blank_share"]
    assert "blank share" in (out / "summary.md").read_text()  # its METRICS label reaches the site


def test_a_plugin_kind_claims_its_checkpoints(plugin_path, tmp_path):
    ckpt = tmp_path / "model.toykind"
    ckpt.write_bytes(b"toy")
    r = run(["build", "-q", "--ckpt", str(ckpt), "--out", str(tmp_path / "site")], plugin_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"reportgen: error: {ckpt}: the toy kind gathers nothing"


def test_templates_dir_overrides_a_shipped_template(tiny_run, tmp_path):
    from click.testing import CliRunner

    from reportgen.cli import main
    from reportgen.render import templates_dir

    mine = tmp_path / "tpl" / "partials"
    mine.mkdir(parents=True)
    shipped = (templates_dir() / "partials" / "solving_stats.html").read_text()
    (mine / "solving_stats.html").write_text('<p id="house-style">Our own statistics section.</p>\n' + shipped)
    args = ["build", "-q", "--ckpt", str(tiny_run["run"] / "step_100"), "--data", str(tiny_run["data"]), "--only",
            "solving_stats", "--samples", "2", "--format", "html"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--templates", str(tmp_path / "tpl")])
    assert r.exit_code == 0, r.output
    html = next((tmp_path / "a").glob("*/step_100/index.html")).read_text()
    assert 'id="house-style"' in html and "Solving statistics" in html
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")])  # the next build uses the shipped ones
    assert 'id="house-style"' not in next((tmp_path / "b").glob("*/step_100/index.html")).read_text()
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--templates", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "templates folder not found" in r.output
