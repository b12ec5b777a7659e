"""The engine's shape: no import cycles among reportgen's modules (lazy imports inside functions included),
model kinds behind one protocol, and `reportgen list` naming what is installed."""
from __future__ import annotations

import ast
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent / "reportgen"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the reportgen modules it imports anywhere in its body (relative and absolute)."""
    mods = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names]  # `from . import x` imports module x
                targets += subs if all(t in mods for t in subs) else [mod] + subs
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles_among_reportgen_modules():
    graph = import_graph()
    assert "reportgen.build" in graph["reportgen.cli"]  # the graph sees lazy imports inside functions
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_runners_and_kinds_never_import_the_build():
    graph = import_graph()
    for m in graph:
        if m == "reportgen.executors" or m.startswith("reportgen.kinds"):
            assert "reportgen.build" not in graph[m], m


def test_every_kind_answers_the_protocol():
    from reportgen import kinds

    for name, mod in kinds.registry().items():
        assert mod.NAME == name
        for attr in kinds.REQUIRED:
            assert hasattr(mod, attr), (name, attr)


def test_the_lm_probe_knows_no_analysis_names():
    import analyses

    src = (ROOT / "probes" / "lm.py").read_text()
    for name in analyses.REGISTRY:
        assert f'"{name}"' not in src and f"'{name}'" not in src, name


def test_reportgen_list_names_kinds_and_analyses():
    from reportgen.cli import main

    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0, r.output
    for word in ("trm", "lm", "sudoku_latents", "token_map", "needs"):
        assert word in r.output


def test_child_command_line_carries_every_option(monkeypatch):
    """--jobs processes and submitit jobs get every build option the parent had (none is hand-listed)."""
    import dataclasses
    import sys

    from reportgen.cli import main
    from reportgen.config import BuildOptions, command_line

    odd = BuildOptions(ckpts=["a", "b"], out="o", data="d", split="train", samples=3, eval="7", select="random", seed=4,
                       device="cpu", dtype="bfloat16", only=["attention"], formats=["html"], figure_formats=["svg", "pdf"],
                       self_contained=True, force=True, jobs=1, executor="none", slurm_partition="p", slurm_gpus=2,
                       slurm_time=9, slurm_cpus=3, write_index=False, config="c.toml", params=["x.y=1", "x.z=2"],
                       threads=2, dpi=150, max_memory="1GiB", quiet=True, vocab="bytes", seq_len=16, max_seqs=9,
                       mask_rate=0.2, mask_id=3, sae=["s", "t"], prompts=["a b", "c"], prompt_files=["p.txt"], train_sae=None, sae_arch="standard", sae_tokens=5000,
                       trust_checkpoint=True, adapter="ad.py", templates="t")
    defaults = BuildOptions(ckpts=[])
    untested = [f.name for f in dataclasses.fields(BuildOptions)
                if getattr(odd, f.name) == getattr(defaults, f.name) and f.name not in ("jobs", "executor", "train_sae")]
    assert not untested, f"give these fields non-default values above: {untested}"
    seen = []
    monkeypatch.setattr(sys.modules["reportgen.build"], "run_build", lambda opts, timer=None, **kw: seen.append(opts))
    argv = command_line(odd, odd.ckpts)
    assert argv[1:4] == ["-m", "reportgen", "build"]
    r = CliRunner().invoke(main, argv[3:])
    assert r.exit_code == 0, r.output
    assert dataclasses.asdict(seen[0]) == dataclasses.asdict(odd)
