"""The sparse runtime on whole (tiny) models: same logits and greedy text as the dense pruned model,
and the `seftc bench` / `seftc generate` commands."""
import json

import pytest
import torch
from click.testing import CliRunner

from seftc.runtime.convert import load_runtime_pair, sparsify_model
from seftc.runtime.linear import SparseLinear

from conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def pruned_dirs(tiny_dir, tmp_path_factory):
    from seftc.prune.api import prune

    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for name, kw in {"u70": dict(sparsity=0.7), "24": dict(pattern="2:4")}.items():
        prune(str(tiny_dir), output=root / name, method="magnitude", **kw)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def packed_dir(pruned_dirs, tmp_path_factory):
    from seftc.formats.packing import pack_folder

    out = tmp_path_factory.mktemp("packed") / "p24"
    pack_folder(pruned_dirs["24"], out, "2:4")
    return out


def _ids():
    return tiny_tokenizer()("Shall I compare thee to a summer's day?", return_tensors="pt").input_ids


@pytest.mark.parametrize("which", ["u70", "24"])
def test_sparse_model_matches_dense_logits_and_greedy(pruned_dirs, which):
    pair = load_runtime_pair(str(pruned_dirs[which]), "float32")
    n_sparse = sum(isinstance(m, SparseLinear) for m in pair.sparse.modules())
    assert n_sparse == len(pair.conversion.converted) == 14  # 2 blocks x 7 linears
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(pair.sparse(ids).logits, pair.dense(ids).logits, rtol=1e-4, atol=1e-4)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(pair.sparse.generate(ids, **kw), pair.dense.generate(ids, **kw))


def test_packed_folder_runs_from_components(packed_dir, pruned_dirs):
    pair = load_runtime_pair(str(packed_dir), "float32")
    assert pair.source == "packed"
    kinds = {m.kind for m in pair.sparse.modules() if isinstance(m, SparseLinear)}
    assert kinds == {"2:4"}
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(pair.sparse(ids).logits, pair.dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_bf16_model_close_to_dense(pruned_dirs):
    pair = load_runtime_pair(str(pruned_dirs["u70"]), "bfloat16")
    ids = _ids()
    with torch.inference_mode():
        a, b = pair.sparse(ids).logits.float(), pair.dense(ids).logits.float()
    assert (a - b).abs().max() < 0.1 * b.abs().max()


def test_dense_layers_below_threshold_stay_linear(tiny_dir):
    from seftc.models.loading import load_model

    model = load_model(str(tiny_dir)).model
    result = sparsify_model(model)
    assert not result.converted and len(result.skipped) == 14


def test_bench_cli_json(pruned_dirs, tmp_path):
    from seftc.cli.bench import bench

    plot = tmp_path / "bench.png"
    r = CliRunner().invoke(bench, [str(pruned_dirs["u70"]), "--batch", "1,2", "--json", "--repeats", "2", "--warmup", "0",
                                   "--prompt-tokens", "8", "--new-tokens", "2", "--layers", "2", "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["device"] == "cpu"
    assert [(x["phase"], x["batch"]) for x in out["results"]] == [("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)]
    for x in out["results"]:
        assert x["dense_ms"] > 0 and x["sparse_ms"] > 0
        assert x["speedup"] == pytest.approx(x["dense_ms"] / x["sparse_ms"])
    assert len(out["layers"]) == 2 and out["byte_bound"] > 1
    assert plot.stat().st_size > 0


def test_bench_cli_rich_and_errors(pruned_dirs, tiny_dir):
    from seftc.cli.bench import bench

    r = CliRunner().invoke(bench, [str(pruned_dirs["24"]), "--batch", "1", "--repeats", "1", "--warmup", "0",
                                   "--prompt-tokens", "4", "--new-tokens", "1", "--layers", "1"])
    assert r.exit_code == 0, r.output
    assert "decode" in r.output and "speedup" in r.output
    r = CliRunner().invoke(bench, [str(pruned_dirs["24"]), "--batch", "0"])
    assert r.exit_code == 2 and "--batch" in r.output
    r = CliRunner().invoke(bench, [str(tiny_dir), "--batch", "1"])  # not pruned
    assert r.exit_code == 2 and "prune it first" in r.output


def test_generate_cli_same_text_as_dense(pruned_dirs):
    from seftc.cli.generate import generate

    args = [str(pruned_dirs["u70"]), "--prompt", "Shall I compare", "--max-new-tokens", "8", "--json"]
    sparse = CliRunner().invoke(generate, args)
    dense = CliRunner().invoke(generate, args + ["--dense"])
    assert sparse.exit_code == 0 and dense.exit_code == 0, sparse.output + dense.output
    s, d = json.loads(sparse.stdout), json.loads(dense.stdout)
    assert s["tokens"] == d["tokens"] and len(s["tokens"]) >= 1 and s["runtime"] == "sparse"


def test_two_four_pruned_layers_get_the_24_layout(pruned_dirs):
    pair = load_runtime_pair(str(pruned_dirs["24"]), "float32", need_dense=False)
    assert pair.dense is None
    assert {m.kind for m in pair.sparse.modules() if isinstance(m, SparseLinear)} == {"2:4"}
