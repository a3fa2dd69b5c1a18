"""`seftc pack` / `seftc unpack` / `seftc.formats.sparse_model.load_sparse` on a tiny random LLaMA."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import pruned_tiny_llama, write_foreign_ct_folder
from seftc.cli.main import cli
from seftc.errors import FormatError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    return folder, pruned_tiny_llama(folder)


@pytest.fixture(scope="module")
def tiny24(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("tiny24") / "model"
    return folder, pruned_tiny_llama(folder, "2:4")


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_loads_identical(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert same_bits(got[k], v), k


@pytest.mark.parametrize("fmt,fixture", [("auto", "tiny"), ("bitmask", "tiny"), ("csr", "tiny"), ("rice", "tiny"), ("2:4", "tiny24"),
                                         ("ct-sparse-bitmask", "tiny"), ("ct-sparse-24-bitmask", "tiny24")])
def test_pack_unpack_round_trip(fmt, fixture, request, tmp_path):
    src, state = request.getfixturevalue(fixture)
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    result = run("pack", str(src), "-o", str(packed), "--format", fmt, "--json")
    summary = json.loads(result.stdout)
    assert summary["tensors"] == len(state)
    assert summary["bytes"] < summary["dense_bytes"]
    if fmt != "auto":
        assert summary["formats"].get(fmt) == 14  # every pruned Linear
    manifest = json.loads((packed / "seftc_pack.json").read_text())
    assert manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["format"] != "dense"
    assert manifest["tensors"]["model.norm.weight"]["format"] == "dense"
    run("unpack", str(packed), "-o", str(dense))
    assert_loads_identical(dense, state)
    assert sorted(p.name for p in dense.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_auto_picks_smallest_per_tensor(tiny, tiny24, tmp_path):
    run("pack", str(tiny24[0]), "-o", str(tmp_path / "a"))
    formats = {r["format"] for r in json.loads((tmp_path / "a" / "seftc_pack.json").read_text())["tensors"].values()}
    assert "2:4" in formats
    sizes = {}
    for fmt in ("auto", "bitmask", "csr", "rice"):
        out = tmp_path / fmt
        run("pack", str(tiny[0]), "-o", str(out), "--format", fmt)
        sizes[fmt] = (out / "packed.safetensors").stat().st_size
    assert sizes["auto"] <= min(sizes.values())


def test_ct_config_and_layout(tiny, tmp_path):
    src, state = tiny
    out = tmp_path / "ct"
    run("pack", str(src), "-o", str(out), "--format", "ct-sparse-bitmask")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert "model.layers.1.mlp.down_proj" in sc["targets"] and abs(sc["global_sparsity"] - 0.5) < 0.01
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"model.layers.0.mlp.up_proj.compressed", "model.layers.0.mlp.up_proj.bitmask",
                "model.layers.0.mlp.up_proj.row_offsets", "model.layers.0.mlp.up_proj.shape"} <= keys
        w = state["model.layers.0.mlp.up_proj.weight"]
        mask = (w != 0).numpy()
        assert np.array_equal(f.get_tensor("model.layers.0.mlp.up_proj.bitmask").numpy(), np.packbits(mask, axis=-1, bitorder="little"))


def test_unpack_foreign_compressed_tensors_folder(tiny, tmp_path):
    """A folder as compressed-tensors writes it: its tensors, its config, no seftc metadata."""
    src, state = tiny
    folder = write_foreign_ct_folder(src, state, tmp_path / "foreign")
    run("unpack", str(folder), "-o", str(tmp_path / "dense"))
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert_loads_identical(tmp_path / "dense", state)


def test_negative_zeros(tmp_path):
    src = tmp_path / "negzero"
    state = pruned_tiny_llama(src, negative_zeros=True)
    result = run("pack", str(src), "-o", str(tmp_path / "p"), "--format", "bitmask", "--json")
    assert "-0.0" in result.stderr and json.loads(result.stdout)["warnings"]
    run("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "u")).state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())  # numerically equal (-0.0 == +0.0)
    sizes = json.loads((tmp_path / "p" / "seftc_pack.json").read_text())["bytes"]
    run("pack", str(src), "-o", str(tmp_path / "exact"), "--format", "bitmask", "--exact-zeros")
    run("unpack", str(tmp_path / "exact"), "-o", str(tmp_path / "ue"))
    assert_loads_identical(tmp_path / "ue", state)  # bit-exact, sign bits included
    assert json.loads((tmp_path / "exact" / "seftc_pack.json").read_text())["bytes"] > sizes


def test_output_rules(tiny, tmp_path):
    src, _ = tiny
    out = tmp_path / "out"
    run("pack", str(src), "-o", str(out))
    before = sorted(p.name for p in src.iterdir())
    r = run("pack", str(src), "-o", str(out), ok=False)
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output and "Traceback" not in r.output
    run("pack", str(src), "-o", str(out), "--force", "--format", "csr")
    assert json.loads((out / "seftc_pack.json").read_text())["format"] == "csr"
    r = run("pack", str(src), "-o", str(src), "--force", ok=False)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    assert sorted(p.name for p in src.iterdir()) == before
    r = run("unpack", str(src), "-o", str(tmp_path / "x"), ok=False)
    assert r.exit_code == 2 and "not a packed model" in r.output and not (tmp_path / "x").exists()
    r = run("pack", str(tmp_path / "missing"), "-o", str(tmp_path / "y"), ok=False)
    assert r.exit_code == 2 and not (tmp_path / "y").exists()


def test_explicit_24_on_unstructured_model_is_refused(tiny, tmp_path):
    r = run("pack", str(tiny[0]), "-o", str(tmp_path / "o"), "--format", "2:4", ok=False)
    assert r.exit_code == 2 and "2:4" in r.output and "--format auto" in r.output
    assert list(tmp_path.iterdir()) == []


def test_corrupt_packed_file_fails_cleanly(tiny, tmp_path):
    packed = tmp_path / "p"
    run("pack", str(tiny[0]), "-o", str(packed))
    f = packed / "packed.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    r = run("unpack", str(packed), "-o", str(tmp_path / "u"), ok=False)
    assert r.exit_code == 2 and "checksum mismatch" in r.output and "'" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing left behind


def test_pack_streams_tensor_by_tensor(tiny, tmp_path, monkeypatch):
    """At most a couple of input tensors are alive at any time while packing."""
    from seftc.formats import packing

    original = packing.iter_tensors
    alive: list[weakref.ref] = []
    peak = [0]

    def spy(files):
        for name, t in original(files):
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(packing, "iter_tensors", spy)
    packing.pack_folder(tiny[0], tmp_path / "o")
    assert len(alive) > 10 and peak[0] <= 1


def test_load_sparse(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from seftc.formats.sparse_model import PackedLinear, load_sparse

    src, state = tiny
    run("pack", str(src), "-o", str(tmp_path / "p"))
    reference = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    compact = load_sparse(tmp_path / "p")
    layer = compact.model.layers[0].mlp.up_proj
    assert isinstance(layer, PackedLinear) and layer.nbytes < state["model.layers.0.mlp.up_proj.weight"].nbytes
    assert same_bits(layer.weight, state["model.layers.0.mlp.up_proj.weight"])
    dense = load_sparse(tmp_path / "p", dense=True)
    assert isinstance(dense.model.layers[0].mlp.up_proj, torch.nn.Linear)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        assert torch.equal(compact(ids).logits, want)
        assert torch.equal(dense(ids).logits, want)


def test_load_sparse_refuses_a_corrupt_folder(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    run("pack", str(tiny[0]), "-o", str(tmp_path / "p"))
    (tmp_path / "p" / "seftc_pack.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a valid pack manifest"):
        load_sparse(tmp_path / "p")


def test_cli_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, seftc.cli.pack; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_choices_match_registry():
    from seftc.compress.recipe import PACK_FORMATS  # `seftc pack --format` choices and the recipe's pack.format
    from seftc.formats.registry import CHOICES

    assert sorted(PACK_FORMATS) == sorted(CHOICES)
