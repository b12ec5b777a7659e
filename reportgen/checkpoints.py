"""Checkpoint discovery, format detection and loading.

A checkpoint is untrusted input: it is read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers. The format is detected from the keys, never the name.
"""
from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ReportgenError, first_line

# step_N (upstream TRM), checkpoint-N (Hugging Face Trainer folders, seed-001 files), epoch=E-step=N.ckpt (Lightning)
STEP_RE = re.compile(r"^(?:step_|checkpoint-|epoch=\d+-step=)(\d+)(\.(pt|pth|ckpt|bin))?$")
# files of a checkpoint folder that do not change what the model computes (Hugging Face Trainer state)
FOLDER_SKIP = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|trainer_state|training_args)\.(pt|pth|bin|json)$")
# byte strings in a checkpoint's pickle stream that tell its kind (state-dict keys are stored as plain strings)
TRM_MARKERS = (b"embed_tokens.embedding_weight", b"lm_head.weight", b"L_level.layers.")
RESTORATION_MARKERS = (b"model_state_dict", b"config", b"d_model")  # seed 004
TL_MARKERS = (b"state_dict", b"cfg", b"W_E")  # {cfg, state_dict} of a HookedTransformer
RUN_OVERVIEW_FILES = ("figures", "data", "index.html", "overview.pdf")  # beside the reports in <out>/<run>/
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
TRM_PREFIXES = ("_orig_mod.", "model.", "inner.")
# all_config.yaml `arch` fields that TRMConfig takes; the rest are training-only or descriptive
TRM_ARCH_FIELDS = (
    "hidden_size", "num_heads", "expansion", "H_cycles", "L_cycles", "L_layers", "halt_max_steps",
    "puzzle_emb_ndim", "puzzle_emb_len", "pos_encodings", "forward_dtype", "mlp_t",
)
TRM_ARCH_IGNORED = ("name", "loss", "H_layers", "halt_exploration_prob", "no_ACT_continue")
MAX_CONFIG_VALUES = 100_000  # values in an all_config.yaml once its aliases are expanded


def safe_name(text: str) -> str:
    """A folder name that cannot escape the output folder: spaces and separators become '-'."""
    name = UNSAFE.sub("-", text).strip("-.")
    return name or "run"


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    run: str  # output folder name of the run (sanitised parent folder name)
    name: str  # output folder name of the checkpoint (e.g. step_400)
    step: int | None

    @property
    def files(self) -> list[Path]:
        """The checkpoint's files: the file itself, or a folder's model files (not its optimizer state)."""
        if not self.path.is_dir():
            return [self.path]
        return sorted(q for q in self.path.rglob("*") if q.is_file() and not FOLDER_SKIP.match(q.name)
                      and not any(part.startswith(".") for part in q.relative_to(self.path).parts))

    @property
    def bytes(self) -> int:
        return sum(q.stat().st_size for q in self.files)

    @property
    def sha256(self) -> str:
        """sha256 of the file; of a folder, of its files' names and bytes in order."""
        h = hashlib.sha256()
        for q in self.files:
            if self.path.is_dir():
                h.update(str(q.relative_to(self.path)).encode() + b"\0")
            with open(q, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def make_ref(path: Path) -> CheckpointRef:
    """The ref of a checkpoint file or folder: run = its folder's name, name = step_N (or its stem)."""
    m = STEP_RE.match(path.name)
    step = int(m.group(1)) if m else None
    name = f"step_{step}" if m else (path.name if path.is_dir() else path.stem)  # a folder's name may hold dots
    return CheckpointRef(path=path, run=safe_name(path.parent.resolve().name), name=safe_name(name), step=step)


def pickle_head(path: Path) -> bytes | None:
    """The pickle stream of a torch.save archive (state-dict keys are plain strings in it), read without torch,
    or None when the file is no such archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return z.read(pkl) if pkl else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


def discover(specs: list[str], detect=None, resolve=None) -> list[CheckpointRef]:
    """Checkpoint files from paths, run folders (every step_N inside) or globs, ordered by run and step.
    detect(path) -> truthy when a folder is itself one checkpoint (a kind claims it, e.g. a Hugging Face folder);
    resolve(spec) -> Path | CheckpointRef | None for a spec that is no path (reportgen.kinds passes both)."""
    detect = detect or (lambda p: None)
    if not specs:
        raise ReportgenError("no checkpoint given: pass --ckpt PATH")
    found: dict[Path, CheckpointRef] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir() and detect(p):  # a folder that is one checkpoint (Hugging Face)
            paths = [p]
        elif p.is_dir():
            steps = [q for q in p.iterdir() if STEP_RE.match(q.name) and (q.is_file() or detect(q))]
            if not steps:  # a folder of named checkpoints (best_model.pt, last_model.pt)
                steps = [q for q in p.iterdir() if q.is_file() and q.suffix in (".pt", ".pth", ".ckpt")]
            if not steps:
                raise ReportgenError(f"{p}: folder holds no step_N or *.pt checkpoint files")
            paths = steps
        elif p.is_file():
            paths = [p]
        elif any(c in spec for c in "*?["):
            paths = [Path(q) for q in sorted(glob.glob(spec)) if Path(q).is_file()]
            if not paths:
                raise ReportgenError(f"{spec}: the pattern matches no checkpoint file")
        elif resolve is not None and (ref := resolve(spec)) is not None:  # e.g. a model id in the local Hugging Face cache
            paths = [ref]
        else:
            raise ReportgenError(f"{p}: checkpoint not found")
        for q in paths:
            r = q if isinstance(q, CheckpointRef) else make_ref(q)
            found.setdefault(r.path.resolve(), r)
    folders: dict[tuple[str, str], CheckpointRef] = {}
    for r in found.values():  # `exp 1` and `exp-1`, or step_5 and step_5.pt: one report would replace the other
        if r.name.casefold() in RUN_OVERVIEW_FILES:
            raise ReportgenError(f"{r.path}: its report folder {r.run}/{r.name} would be the run overview's "
                                 f"{r.name}; rename the checkpoint")
        other = folders.setdefault((r.run.casefold(), r.name.casefold()), r)
        if other is not r:
            a, b = sorted((other.path, r.path))
            raise ReportgenError(f"{a} and {b}: both checkpoints would be written to the report folder "
                                 f"{other.run}/{other.name} (names are made folder-safe); rename one, or build them "
                                 f"into different --out folders")
    return sorted(found.values(), key=lambda r: (r.run, r.step if r.step is not None else -1, r.name))


def _torch_load(path: Path):
    """The checkpoint's top-level object, loaded on CPU with weights_only=True; one line for any failure."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read an untrusted file is the user's bad input
        text = str(e).strip()
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
            why = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("WeightsUnpickler error")), "")
            why = why.removeprefix("WeightsUnpickler error: ").split(". Please")[0]
            raise ReportgenError(
                f"{path}: refused to load: it holds pickled Python objects that weights_only=True does not allow"
                + (f" ({why[:160]})" if why else "")
            ) from None
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:
            raise ReportgenError(f"{path}: not a readable PyTorch checkpoint (neither a torch.save archive nor a legacy torch file)") from None
        first = (text.splitlines()[0] if text else type(e).__name__).split(". ")[0]
        raise ReportgenError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated archive: {first[:120]})") from None


def read_state_dict(path: Path) -> dict:
    """Tensors of a checkpoint file, loaded on CPU with weights_only=True, all of them finite."""
    import torch

    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # {"model", "optimizers", "step", ...} variant seen in forks
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ReportgenError(f"{path}: not a TRM checkpoint (expected a state dict of named tensors)")
    check_finite(path, obj)
    return obj


def check_finite(path: Path, tensors: dict, allow_inf: tuple[str, ...] = ()) -> None:
    """Raise naming the first tensor that holds NaN or ±inf (a diverged run, or a damaged file): its report
    would be NaN throughout. Tensors whose names end with one of `allow_inf` may hold ±inf (attention masks)."""
    import torch

    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        chunks = t.detach().reshape(-1).split(1 << 24)  # bounded extra memory on a big embedding
        if all(bool(torch.isfinite(c).all()) for c in chunks):
            continue
        nan = sum(int(torch.isnan(c).sum()) for c in chunks)
        inf = 0 if name.endswith(allow_inf) else sum(int(torch.isinf(c).sum()) for c in chunks)
        if nan or inf:
            what = " and ".join(w for n, w in ((nan, f"{nan:,} NaN"), (inf, f"{inf:,} infinite")) if n)
            raise ReportgenError(f"{path}: tensor {name} holds {what} value(s) of {t.numel():,} (a diverged run or "
                                 f"a damaged file); reportgen does not report on it")


def strip_trm_prefixes(sd: dict) -> dict:
    return strip_prefixes(sd, TRM_PREFIXES)


def strip_prefixes(sd: dict, prefixes: tuple[str, ...]) -> dict:
    """State-dict keys without wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`, ...)."""
    out = {}
    for k, v in sd.items():
        for pre in prefixes:
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def is_trm(sd: dict) -> bool:
    return "embed_tokens.embedding_weight" in sd and "lm_head.weight" in sd and any(k.startswith("L_level.layers.") for k in sd)


@dataclass
class TRMSubject:
    """A loaded TRM checkpoint ready to probe."""

    ref: CheckpointRef
    model: object  # reportgen.models.trm.TRM, in eval mode on CPU
    config: object  # TRMConfig as run (forward_dtype possibly overridden)
    trained_dtype: str  # forward_dtype of the checkpoint's config
    run_config: dict  # the whole all_config.yaml, or {} when missing
    config_path: Path | None
    notes: list[str] = field(default_factory=list)


def read_run_config(ckpt: Path) -> tuple[dict, Path | None]:
    import yaml

    path = ckpt.parent / "all_config.yaml"
    if not path.is_file():
        return {}, None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ReportgenError(f"{path}: not valid YAML ({first_line(e, 200)})") from None
    if _expands_beyond(cfg, MAX_CONFIG_VALUES):  # aliases of aliases ("billion laughs") or a recursive alias
        raise ReportgenError(f"{path}: its YAML aliases expand to more than {MAX_CONFIG_VALUES:,} values; "
                             f"reportgen does not expand it (an upstream all_config.yaml has a few dozen)")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("arch"), dict):
        raise ReportgenError(f"{path}: has no 'arch' mapping (not an upstream TRM all_config.yaml)")
    return cfg, path


def _expands_beyond(obj, budget: int) -> bool:
    """True when `obj`, with every shared (aliased) part counted each time it is reached, has more than
    `budget` values; stops counting there, so a cycle or a billion laughs costs `budget` steps."""
    stack, n = [obj], 0
    while stack:
        o = stack.pop()
        n += 1
        if n > budget:
            return True
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
    return False


def trm_config_from(sd: dict, run_config: dict, dataset_meta: dict | None, config_path: Path | None):
    """TRMConfig from all_config.yaml, tensor shapes and dataset.json; records each field's source."""
    from .models.trm import TRMConfig, inner_width

    src: dict[str, str] = {}
    kw: dict = {}
    arch = run_config.get("arch", {})
    ycfg = config_path.name if config_path else None
    for k in TRM_ARCH_FIELDS:
        if k in arch:
            kw[k] = arch[k]
            src[k] = ycfg
    unknown = sorted(set(arch) - set(TRM_ARCH_FIELDS) - set(TRM_ARCH_IGNORED))
    if unknown:
        raise ReportgenError(f"{config_path}: unknown arch field(s) {', '.join(unknown)} (not a TRM config reportgen knows)")

    # From shapes: these must agree with the weights whatever the YAML says.
    V, D = sd["embed_tokens.embedding_weight"].shape
    kw["vocab_size"], src["vocab_size"] = int(V), "tensor shapes"
    if "hidden_size" not in kw:
        kw["hidden_size"], src["hidden_size"] = int(D), "tensor shapes"
    if "L_layers" not in kw:
        kw["L_layers"] = len({k.split(".")[2] for k in sd if k.startswith("L_level.layers.")})
        src["L_layers"] = "tensor shapes"
    if "mlp_t" not in kw:
        kw["mlp_t"], src["mlp_t"] = any(".mlp_t." in k for k in sd), "tensor shapes"
    if "puzzle_emb.weights" in sd:
        n_ids, ndim = sd["puzzle_emb.weights"].shape
        kw["num_puzzle_identifiers"], src["num_puzzle_identifiers"] = int(n_ids), "tensor shapes"
        if "puzzle_emb_ndim" not in kw:
            kw["puzzle_emb_ndim"], src["puzzle_emb_ndim"] = int(ndim), "tensor shapes"
    elif "puzzle_emb_ndim" not in kw:
        kw["puzzle_emb_ndim"], src["puzzle_emb_ndim"] = 0, "tensor shapes"
    if "pos_encodings" not in kw and "embed_pos.embedding_weight" in sd:
        kw["pos_encodings"], src["pos_encodings"] = "learned", "tensor shapes"
    if "expansion" not in kw:
        g = sd.get("L_level.layers.0.mlp.gate_up_proj.weight")
        fits = [e for e in (4, 2, 1, 3, 6, 8) if g is not None and 2 * inner_width(e, kw["hidden_size"]) == g.shape[0]]
        if fits:  # the SwiGLU width is rounded up to 256, so several expansions can fit; upstream's 4 first
            kw["expansion"], src["expansion"] = fits[0], "tensor shapes"
    if dataset_meta is not None:
        kw["seq_len"], src["seq_len"] = int(dataset_meta["seq_len"]), "dataset.json"
    if kw.get("mlp_t") and "puzzle_emb_len" not in kw:
        t = sd.get("L_level.layers.0.mlp_t.gate_up_proj.weight")
        if t is not None:
            kw["puzzle_emb_len"] = int(t.shape[1]) - kw.get("seq_len", 81)
            src["puzzle_emb_len"] = "tensor shapes"
    for k in TRM_ARCH_FIELDS:
        if k not in kw:
            src[k] = "upstream default (assumed)"
    for k in ("seq_len", "rms_norm_eps", "rope_theta"):
        src.setdefault(k, "upstream default")
    try:
        cfg = TRMConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ReportgenError(f"{config_path or 'checkpoint'}: invalid TRM config ({e})") from None
    cfg.sources = src
    return cfg


def load_trm(ref: CheckpointRef, sd: dict, run_config: dict, config_path: Path | None,
             dataset_meta: dict | None, dtype: str = "float32") -> TRMSubject:
    """Build our TRM from a stripped upstream state dict and check every tensor against the config."""
    import torch

    from .models.trm import TRM

    cfg = trm_config_from(sd, run_config, dataset_meta, config_path)
    trained_dtype = cfg.forward_dtype
    if dtype in ("float32", "bfloat16", "float16"):
        cfg.forward_dtype = dtype
    elif dtype != "config":
        raise ReportgenError(f"--dtype must be float32, bfloat16, float16 or config, not {dtype!r}")
    torch.manual_seed(0)
    model = TRM(cfg)
    expected = model.state_dict()
    where = config_path.name if config_path else "the derived config"
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if extra:
            what.append(f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
        raise ReportgenError(f"{ref.path}: tensors do not match {where}: {'; '.join(what)}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ReportgenError(
                f"{ref.path}: tensor {k} has shape {list(sd[k].shape)} but {where} "
                f"(hidden_size={cfg.hidden_size}, num_heads={cfg.num_heads}, expansion={cfg.expansion}) needs {list(t.shape)}"
            )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    model.eval()
    notes = []
    if config_path is None:
        notes.append(
            "No all_config.yaml beside the checkpoint: the configuration was derived from tensor shapes and "
            "dataset.json; fields marked 'upstream default (assumed)' could not be derived."
        )
    return TRMSubject(ref=ref, model=model, config=cfg, trained_dtype=trained_dtype, run_config=run_config,
                      config_path=config_path, notes=notes)
