"""Loading upstream-format TRM checkpoints gives back the model that was saved."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import UPSTREAM, needs_upstream, make_model, run_act, save_upstream, write_dataset
from reportgen.checkpoints import discover, load_trm, read_run_config, read_state_dict, strip_trm_prefixes
from reportgen.data.puzzles import read_split
from reportgen.errors import ReportgenError


def load(path, data_dir, dtype="float32"):
    ref = discover([str(path)])[0]
    sd = strip_trm_prefixes(read_state_dict(ref.path))
    rc, cp = read_run_config(ref.path)
    return load_trm(ref, sd, rc, cp, read_split(data_dir, "test").meta, dtype)


def assert_same_steps(a, b, data_dir):
    ds = read_split(data_dir, "test")
    ra, za_H, za_L = run_act(a, ds.inputs, ds.puzzle_identifiers)
    rb, zb_H, zb_L = run_act(b, ds.inputs, ds.puzzle_identifiers)
    for (la, qa, ca), (lb, qb, cb) in zip(ra, rb):
        assert torch.equal(la, lb) and torch.equal(qa, qb) and torch.equal(ca, cb)
    assert torch.equal(za_H, zb_H) and torch.equal(za_L, zb_L)


@pytest.mark.parametrize("arch", [
    {},
    {"mlp_t": True, "pos_encodings": "none"},
    {"pos_encodings": "learned"},
    {"puzzle_emb_ndim": 0, "puzzle_emb_len": 0},
], ids=["att-rope", "mlp_t", "learned-pos", "no-puzzle-emb"])
def test_saved_upstream_way_loads_back_identically(tmp_path, arch):
    data = write_dataset(tmp_path / "data")
    model = make_model(3, **arch)
    path = save_upstream(model, tmp_path / "run", 7, str(data))
    subj = load(path, data)
    assert subj.config.to_dict() == model.cfg.to_dict()
    assert subj.ref.step == 7 and subj.ref.run == "run"
    assert_same_steps(model, subj.model, data)


@pytest.mark.parametrize("prefix", ["_orig_mod.model.inner.", "model.inner.", ""])
def test_optional_prefixes(tmp_path, prefix):
    data = write_dataset(tmp_path / "data")
    model = make_model(4)
    subj = load(save_upstream(model, tmp_path / "run", 1, str(data), prefix=prefix), data)
    assert_same_steps(model, subj.model, data)


def test_dict_with_model_key_and_bf16_inits(tmp_path):
    data = write_dataset(tmp_path / "data")
    model = make_model(5)
    path = save_upstream(model, tmp_path / "run", 2, str(data), init_dtype=torch.bfloat16)
    sd = torch.load(path, weights_only=True)
    assert sd["_orig_mod.model.inner.H_init"].dtype == torch.bfloat16
    torch.save({"model": sd, "optimizers": [], "step": 2}, path)
    subj = load(path, data)
    assert torch.equal(subj.model.H_init, model.H_init.to(torch.bfloat16).float())


def test_cuda_saved_tensors_load_on_cpu(tmp_path):
    """A checkpoint whose storages are tagged cuda:0 (as real runs are) loads on a CPU-only machine."""
    import zipfile

    data = write_dataset(tmp_path / "data")
    model = make_model(6)
    path = save_upstream(model, tmp_path / "run", 3, str(data))
    with zipfile.ZipFile(path) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(k for k in items if k.endswith("data.pkl"))
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # pickle BINUNICODE location tags
    assert cpu in items[pkl]
    items[pkl] = items[pkl].replace(cpu, cuda)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, v in items.items():
            z.writestr(k, v)
    with pytest.raises(RuntimeError):  # the tag is real: without map_location this needs CUDA
        torch.load(path, weights_only=True)
    assert_same_steps(model, load(path, data).model, data)


def test_missing_config_is_derived_and_said(tmp_path):
    data = write_dataset(tmp_path / "data")
    model = make_model(7, num_heads=8, H_cycles=3, L_cycles=6, halt_max_steps=16, puzzle_emb_len=16, L_layers=2)
    path = save_upstream(model, tmp_path / "run", 9, str(data), write_config=False)
    subj = load(path, data)
    assert subj.config_path is None and subj.notes
    assert subj.config.sources["hidden_size"] == "tensor shapes"
    assert subj.config.sources["num_heads"] == "upstream default (assumed)"
    assert subj.config.to_dict() == model.cfg.to_dict()


def test_bf16_config_dtype_runs_in_bf16(tmp_path):
    data = write_dataset(tmp_path / "data")
    model = make_model(8, forward_dtype="bfloat16")
    path = save_upstream(model, tmp_path / "run", 1, str(data))
    assert load(path, data).config.forward_dtype == "float32"
    subj = load(path, data, dtype="config")
    assert subj.config.forward_dtype == "bfloat16" and subj.trained_dtype == "bfloat16"
    x = subj.model.input_embeddings(torch.ones(2, 81, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert x.dtype == torch.bfloat16


def test_shape_mismatch_names_the_tensor(tmp_path):
    data = write_dataset(tmp_path / "data")
    path = save_upstream(make_model(1), tmp_path / "run", 1, str(data))
    cfg = (tmp_path / "run" / "all_config.yaml").read_text().replace("expansion: 4", "expansion: 16")
    (tmp_path / "run" / "all_config.yaml").write_text(cfg)
    with pytest.raises(ReportgenError, match=r"step_1: tensor L_level\.layers\.0\.mlp\.gate_up_proj\.weight has shape"):
        load(path, data)


def test_dataset_dtypes_int64_and_uint8(tmp_path):
    data = write_dataset(tmp_path / "data", test_dtype=np.int64)
    a = read_split(data, "test")
    b = read_split(write_dataset(tmp_path / "d2", test_dtype=np.uint8), "test")
    assert a.inputs.dtype == b.inputs.dtype == np.int64
    assert np.array_equal(a.inputs, b.inputs)


# --- the real upstream files -------------------------------------------------------------------------------

@needs_upstream
def test_upstream_checkpoint_reproduces_upstream_eval_dump():
    """Our float32 forward gives upstream's own final predictions and q logits on upstream's files."""
    ckpt = UPSTREAM / "checkpoints" / "pretrain_att_sudoku_mini" / "step_400"
    data = UPSTREAM / "data" / "sudoku-mini-aug-3"
    subj = load(ckpt, data)
    assert subj.config.hidden_size == 64 and subj.config.halt_max_steps == 4
    dump = torch.load(ckpt.parent / "step_400_all_preds.0", weights_only=True)
    ds = read_split(data, "test")
    n = len(ds)
    assert np.array_equal(dump["inputs"][:n].numpy(), ds.inputs)
    steps, _, _ = run_act(subj.model, ds.inputs, ds.puzzle_identifiers)
    logits, q_halt, q_cont = steps[-1]
    top2 = logits.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < 1e-3
    agree = logits.argmax(-1) == dump["preds"][:n]
    assert bool((agree | near_tie).all())
    assert agree.float().mean() > 0.999
    assert torch.allclose(q_halt, dump["q_halt_logits"][:n], atol=1e-4)
    assert torch.allclose(q_cont, dump["q_continue_logits"][:n], atol=1e-4)
