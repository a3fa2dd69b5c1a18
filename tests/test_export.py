"""`seftc export --onnx`: onnxruntime parity (full forward and KV-cache decoding), sparse
initializers, and bad-input conduct, on tiny random models."""
import json
from pathlib import Path

import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from seftc.cli.export import export as export_cmd  # noqa: E402
from seftc.errors import SeftcError  # noqa: E402
from seftc.export.onnx import OnnxCausalLM, export_onnx, sparsify_initializers  # noqa: E402
from seftc.models.loading import LoadedModel, ModelRef, load_model  # noqa: E402

from conftest import build_tiny_model, tiny_tokenizer  # noqa: E402


def run(*args):
    """`seftc export ARGS` through the main group once it lists the command, else directly."""
    from seftc.cli.main import COMMANDS, _quiet_transformers, cli

    if "export" in COMMANDS:
        result = CliRunner().invoke(cli, ["export", *map(str, args)])
    else:
        _quiet_transformers()
        result = CliRunner().invoke(export_cmd, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "kv"
    return export_onnx(tiny_dir, out)


@pytest.fixture(scope="module")
def pruned70(tmp_path_factory):
    from seftc.prune.api import prune

    loaded = LoadedModel(build_tiny_model("llama"), tiny_tokenizer(), ModelRef("folder", Path("."), "tiny-llama"))
    out = tmp_path_factory.mktemp("pruned") / "m70"
    prune(loaded, method="magnitude", sparsity=0.7, output=out)
    return out


def test_export_with_kv_cache_writes_a_checked_folder(exported, tiny_dir):
    r = exported
    assert r.kv_cache and r.num_layers == 2 and r.kv_heads == 2 and r.head_dim == 16
    assert r.inputs[:2] == ["input_ids", "attention_mask"] and "past_key_values.1.value" in r.inputs
    assert r.outputs[0] == "logits" and "present.0.key" in r.outputs
    assert r.max_abs_error is not None and r.relative_error <= 1e-5
    kinds = {c["kind"] for c in r.checks}
    assert kinds == {"full", "prefill+3 decode steps", "left-padded batch"}
    names = {p.name for p in r.path.iterdir()}
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json"} <= names and ".raw" not in names
    assert json.loads((r.path / "export.json").read_text())["max_abs_error"] == r.max_abs_error
    assert r.bytes == (r.path / "model.onnx").stat().st_size
    session = ort.InferenceSession(str(r.model_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == r.inputs and [o.name for o in session.get_outputs()] == r.outputs
    shape = session.get_inputs()[2].shape
    assert isinstance(shape[0], str) and shape[1] == 2 and isinstance(shape[2], str) and shape[3] == 16


def test_greedy_decoding_with_the_onnx_cache_matches_pytorch(exported, tiny_dir):
    model = load_model(tiny_dir).model
    runner = OnnxCausalLM(exported.path)
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    logits, past = runner(ids.numpy())
    seq = ids
    with torch.no_grad():
        for _ in range(3):
            ref = model(input_ids=seq).logits[0, -1]
            assert np.abs(ref.numpy() - logits[0, -1]).max() < 1e-4
            nxt = int(ref.argmax())
            assert nxt == int(logits[0, -1].argmax())
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            logits, past = runner(np.array([[nxt]]), past=past)
            assert past[0].shape == (1, 2, seq.shape[1], 16)


def test_batched_decoding_with_left_padding(exported, tiny_dir):
    model = load_model(tiny_dir).model
    runner = OnnxCausalLM(exported.path)
    rows = [[7, 8, 9, 10, 11], [30, 31, 32]]
    ids = np.array([rows[0], [0, 0] + rows[1]])
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    _, past = runner(ids, mask)
    step = np.array([[12], [33]])
    logits, _ = runner(step, np.concatenate([mask, [[1], [1]]], axis=1), past=past)
    with torch.no_grad():
        for r, row in enumerate(rows):
            ref = model(input_ids=torch.tensor([row + [int(step[r, 0])]])).logits[0, -1]
            assert np.abs(ref.numpy() - logits[r, -1]).max() < 1e-4


def test_export_without_kv_cache(tiny_dir, tmp_path):
    r = export_onnx(tiny_dir, tmp_path / "nokv", kv_cache=False)
    assert r.inputs == ["input_ids", "attention_mask"] and r.outputs == ["logits"]
    assert r.relative_error <= 1e-5 and {c["kind"] for c in r.checks} == {"full", "left-padded batch"}
    logits, present = OnnxCausalLM(r.path)(np.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 320) and present == []


def test_sparse_initializers_shrink_a_70pct_pruned_model_and_keep_its_logits(pruned70, tmp_path):
    dense = export_onnx(pruned70, tmp_path / "dense", sparse_initializers=False)
    sparse = export_onnx(pruned70, tmp_path / "sparse")
    strict = export_onnx(pruned70, tmp_path / "strict", sparse_index_dtype="int64")
    assert dense.sparse_tensors == 0 and sparse.sparse_tensors == 14 == strict.sparse_tensors  # 7 linears x 2 blocks
    assert sparse.bytes < strict.bytes < dense.bytes
    assert sparse.bytes < 0.8 * dense.bytes
    assert sparse.max_abs_error <= 1e-5
    proto = onnx.load(str(sparse.model_file))
    assert len(proto.graph.sparse_initializer) == 14
    assert proto.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT32
    onnx.checker.check_model(onnx.load(str(strict.model_file)))  # int64 indices: valid ONNX
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    a, _ = OnnxCausalLM(dense.path)(ids)
    b, _ = OnnxCausalLM(sparse.path)(ids)
    np.testing.assert_array_equal(a, b)


def test_sparsify_leaves_dense_tensors_dense():
    from onnx import helper, numpy_helper

    half = np.arange(1, 65, dtype=np.float32).reshape(8, 8)
    half[:, ::2] = 0  # 50%: int32 indices make it no smaller
    third = np.ones((8, 9), np.float32)
    third[:, :6] = 0  # 1/3 density
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(half, "half"), numpy_helper.from_array(third, "third")])
    assert sparsify_initializers(graph, "int32") == 1
    assert [i.name for i in graph.initializer] == ["half"] and graph.sparse_initializer[0].values.name == "third"
    assert sparsify_initializers(graph, "int64") == 0  # 1/3 density does not pay with int64 indices


def test_cli_json_and_force(tiny_dir, tmp_path):
    out = tmp_path / "cli"
    code, stdout, stderr = run(tiny_dir, "-o", out, "--onnx", "--json", "--no-kv-cache")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["kv_cache"] is False and info["max_abs_error"] < 1e-4 and Path(info["model_file"]).is_file()
    before = (out / "model.onnx").stat().st_mtime_ns
    code, _, stderr = run(tiny_dir, "-o", out)
    assert code == 2 and "already exists" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "model.onnx").stat().st_mtime_ns == before
    code, _, stderr = run(tiny_dir, "-o", out, "--force", "--no-check", "--dense-initializers")
    assert code == 0, stderr
    assert json.loads((out / "export.json").read_text())["kv_cache"] is True


@pytest.mark.parametrize("args, message", [
    (["{missing}", "-o", "{out}"], "does not exist"),
    (["{model}", "-o", "{model}/sub"], "overwrite the input"),
    (["{model}", "-o", "{out}", "--opset", "7"], "--opset 7"),
    (["{model}", "-o", "{out}", "--tolerance", "0"], "--tolerance"),
    (["{model}", "-o", "{out}", "--tolerance", "1e-12", "--no-kv-cache"], "above the tolerance"),
    (["{model}", "-o", "{out}", "--prompt", "a"], "fewer than 2 tokens"),
])
def test_bad_input_fails_cleanly(tiny_dir, tmp_path, args, message):
    out = tmp_path / "out"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_dir.iterdir())
    fill = {"missing": tmp_path / "nope", "out": out, "model": tiny_dir}
    code, stdout, stderr = run(*[a.format(**fill) for a in args])
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp folder left either
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_dir.iterdir()) == before


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(SeftcError, match=r"pip install 'seftc\[onnx\]'"):
        export_onnx(build_tiny_model(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
