"""Issue 11, the formats side: what an attacker who can edit a packed folder (and recompute the
checksums, which are not a signature) must not achieve. Each test reproduces one reported defect.

Files are forged here with the plain safetensors library and `sha256_of`, bypassing seftc's writer,
exactly as an attacker would."""
from __future__ import annotations

import json
import shutil
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import pruned_tiny_llama, write_foreign_ct_folder
from seftc.cli.main import cli
from seftc.errors import FormatError, SeftcError
from seftc.formats.base import PackedTensor, np_bits, sha256_of, st_name
from seftc.formats.io import PackedReader, PackedWriter, load_packed
from seftc.formats.registry import get_codec


# --- helpers ---------------------------------------------------------------------------------

def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert "Traceback" not in result.output and result.output.startswith("error: ") or "\nerror: " in result.output
    return result


def forge(path: Path, tensors: dict[str, PackedTensor | torch.Tensor], extra: dict[str, str] | None = None,
          checksums: bool = True) -> Path:
    """Write a file as seftc would, but with whatever names/shapes/params the attacker likes and
    checksums recomputed over them (or no seftc metadata at all)."""
    flat, entries = {}, {}
    for name, p in tensors.items():
        if isinstance(p, torch.Tensor):
            p = PackedTensor("dense", tuple(p.shape), p.dtype, {"data": p})
        codec = get_codec(p.format)
        for comp in codec.components:
            flat[codec.key(name, comp)] = p.components[comp].contiguous()
        comps = [(c, p.components[c]) for c in codec.components]
        entries[name] = {"format": p.format, "version": 1, "dtype": st_name(p.dtype), "shape": list(p.shape),
                         "params": dict(p.params), "sha256": sha256_of(name, p.format, 1, st_name(p.dtype), tuple(p.shape), p.params, comps)}
    meta = {"format": "pt"}
    if checksums:
        meta.update({"seftc.container": "1", "seftc.tensors": json.dumps(entries)})
    meta.update(extra or {})
    save_file(flat, str(path), metadata=meta)
    return path


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | str, body: bytes) -> bytes:
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def read_all(path: Path, legacy: str | None = None) -> dict[str, torch.Tensor]:
    return load_packed(path, legacy)


def sparse_matrix(rows: int, cols: int, density: float, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return torch.where(torch.rand(rows, cols, generator=g) < density, w, torch.zeros((), dtype=dtype))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("hard") / "model"
    return folder, pruned_tiny_llama(folder)


def packed_tensors(src: Path, out: Path, fmt: str = "auto") -> dict[str, PackedTensor]:
    """Pack `src` into `out` and return its stored tensors (packed form), for forging."""
    run("pack", str(src), "-o", str(out), "--format", fmt)
    with PackedReader(out / "packed.safetensors") as r:
        return {n: r.read(n) for n in r.names()}


def strip_seftc(path: Path) -> None:
    """Remove every seftc key from a safetensors file's metadata, keeping the tensors as they are."""
    header, body = split(path.read_bytes())
    header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if not k.startswith("seftc.")}
    path.write_bytes(join(header, body))


def set_first_value(path: Path, key: str, value: float) -> None:
    """Overwrite the first element of tensor `key` in place (the attack's 'value edited to 1000.0')."""
    header, body = split(path.read_bytes())
    start, _ = header[key]["data_offsets"]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[header[key]["dtype"]]
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    body = body[:start] + raw + body[start + len(raw):]
    path.write_bytes(join(header, body))


# --- 5: integrity that can be stripped ------------------------------------------------------------

@pytest.fixture
def ct_packed(tiny, tmp_path) -> Path:
    out = tmp_path / "ct"
    run("pack", str(tiny[0]), "-o", str(out), "--format", "ct-sparse-bitmask")
    return out


def test_stripped_ct_folder_is_not_read_as_foreign(ct_packed, tmp_path):
    """Deleting seftc_pack.json and the seftc header metadata (then editing a value) must not
    turn a seftc folder into a 'foreign' one read with structure checks only."""
    strip_seftc(ct_packed / "model.safetensors")
    (ct_packed / "seftc_pack.json").unlink()
    set_first_value(ct_packed / "model.safetensors", "model.layers.0.mlp.up_proj.compressed", 1000.0)
    r = run("unpack", str(ct_packed), "-o", str(tmp_path / "dense"), ok=False)
    assert "checksums" in r.output and "seftc" in r.output
    assert not (tmp_path / "dense").exists()
    from seftc.formats.sparse_model import load_sparse

    with pytest.raises(FormatError, match="checksums"):
        load_sparse(ct_packed)


def test_stripping_only_the_manifest_or_only_the_tensors_key_is_refused(ct_packed, tmp_path):
    header, body = split((ct_packed / "model.safetensors").read_bytes())
    del header["__metadata__"]["seftc.tensors"]  # seftc.container still says seftc wrote it
    (ct_packed / "model.safetensors").write_bytes(join(header, body))
    (ct_packed / "seftc_pack.json").unlink()
    r = run("unpack", str(ct_packed), "-o", str(tmp_path / "d1"), ok=False)
    assert "checksums" in r.output
    with pytest.raises(FormatError, match="seftc"):
        read_all(ct_packed / "model.safetensors", legacy="ct-sparse-bitmask")


def test_stripped_config_marker_alone_still_refuses(ct_packed, tmp_path):
    """The header and the manifest gone, config.json as seftc wrote it: its seftc marker refuses."""
    strip_seftc(ct_packed / "model.safetensors")
    (ct_packed / "seftc_pack.json").unlink()
    config = json.loads((ct_packed / "config.json").read_text())
    assert any(k.startswith("seftc") for k in config)  # the writer's fingerprint
    r = run("unpack", str(ct_packed), "-o", str(tmp_path / "d"), ok=False)
    assert "seftc" in r.output and "checksums" in r.output


def test_generate_on_a_stripped_folder_names_the_integrity_problem(ct_packed):
    """Manifest, header metadata and even the compressed-tensors block gone, the marker left:
    generate treats it as the packed folder it is and refuses it, not as a broken dense model."""
    strip_seftc(ct_packed / "model.safetensors")
    (ct_packed / "seftc_pack.json").unlink()
    config = json.loads((ct_packed / "config.json").read_text())
    del config["quantization_config"]
    (ct_packed / "config.json").write_text(json.dumps(config))
    r = run("generate", str(ct_packed), "--prompt", "hi", ok=False)
    assert "written by seftc" in r.output and "seftc_pack" in r.output


def test_missing_manifest_with_seftc_files_is_not_called_foreign(ct_packed, tmp_path):
    """Only seftc_pack.json and the config marker deleted: the files still say seftc wrote them, so
    the folder is refused rather than reported as a foreign one read without checksums."""
    (ct_packed / "seftc_pack.json").unlink()
    config = json.loads((ct_packed / "config.json").read_text())
    (ct_packed / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("seftc")}))
    r = run("unpack", str(ct_packed), "-o", str(tmp_path / "d"), ok=False)
    assert "written by seftc" in r.output and "seftc.container" in r.output and "foreign" not in r.output


def test_foreign_folder_is_read_but_says_so(tiny, tmp_path):
    folder = write_foreign_ct_folder(*tiny, tmp_path / "foreign")
    r = run("unpack", str(folder), "-o", str(tmp_path / "dense"), "--json")
    assert "read without checksums (foreign compressed-tensors folder)" in r.stderr
    assert json.loads(r.stdout)["checksums"] == "none (foreign compressed-tensors folder)"
    r = run("unpack", str(folder), "-o", str(tmp_path / "dense2"))
    assert "read without checksums (foreign compressed-tensors folder)" in r.stderr
    # seftc's own folder says its checksums were verified
    run("pack", str(tiny[0]), "-o", str(tmp_path / "own"), "--format", "ct-sparse-bitmask")
    r = run("unpack", str(tmp_path / "own"), "-o", str(tmp_path / "dense3"), "--json")
    assert json.loads(r.stdout)["checksums"] == "verified" and "without checksums" not in r.stderr


def test_unpack_drops_the_pack_marker(ct_packed, tmp_path):
    run("unpack", str(ct_packed), "-o", str(tmp_path / "dense"))
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not any(k.startswith("seftc") for k in config) and "quantization_config" not in config


# --- 6: tensor names -----------------------------------------------------------------------------

BAD_NAMES = ["__metadata__", "", "a/b", "a\\b", "a\x00b", "line\nbreak", "tab\there", "\x7f"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_writer_refuses_bad_tensor_names(tmp_path, name):
    with pytest.raises(FormatError, match="tensor name"):
        with PackedWriter(tmp_path / "x.safetensors") as w:
            w.add(name, torch.ones(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", BAD_NAMES)
def test_reader_refuses_bad_tensor_names(tmp_path, name):
    w = sparse_matrix(4, 8, 0.5)
    path = forge(tmp_path / "x.safetensors", {name: get_codec("bitmask").from_dense(w)})
    with pytest.raises(FormatError, match="tensor name"):
        read_all(path)


def test_reader_refuses_duplicate_tensor_names(tmp_path):
    path = forge(tmp_path / "x.safetensors", {"a": torch.ones(2), "b": torch.ones(2)})
    header, body = split(path.read_bytes())
    entries = header["__metadata__"]["seftc.tensors"]
    a = json.dumps(json.loads(entries)["a"])
    header["__metadata__"]["seftc.tensors"] = "{" + f'"a":{a},"a":{a},"b":' + json.dumps(json.loads(entries)["b"]) + "}"
    path.write_bytes(join(header, body))
    with pytest.raises(FormatError, match="twice|duplicate"):
        read_all(path)


def test_unpack_of_a_tensor_named_metadata_fails_cleanly(tiny, tmp_path):
    """The reported case: a checksummed sparse tensor named `__metadata__` unpacked to an
    unreadable file, exit 0."""
    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out, "bitmask")
    tensors["__metadata__"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    forge(out / "packed.safetensors", tensors)
    r = run("unpack", str(out), "-o", str(tmp_path / "u"), ok=False)
    assert "__metadata__" in r.output and not (tmp_path / "u").exists()


# --- 7: remote code --------------------------------------------------------------------------------

@pytest.fixture
def remote_code_folder(tiny, tmp_path) -> tuple[Path, Path]:
    """A packed folder whose config.json names its own Python (auto_map); importing it would
    create a sentinel file."""
    out = tmp_path / "p"
    run("pack", str(tiny[0]), "-o", str(out))
    sentinel = tmp_path / "ran"
    (out / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n"
                                 "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (out / "config.json").write_text(json.dumps(config))
    return out, sentinel


def test_load_sparse_refuses_auto_map(remote_code_folder):
    from seftc.formats.sparse_model import load_sparse

    folder, sentinel = remote_code_folder
    with pytest.raises(SeftcError, match="--trust-remote-code"):
        load_sparse(folder)
    assert not sentinel.exists()


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["bench", "--repeats", "1", "--warmup", "0"]])
def test_generate_and_bench_refuse_auto_map(remote_code_folder, command):
    folder, sentinel = remote_code_folder
    r = run(command[0], str(folder), *command[1:], ok=False)
    assert "--trust-remote-code" in r.output and not sentinel.exists()


def test_bench_model_refuses_auto_map(remote_code_folder):
    from seftc.runtime.bench import bench_model

    folder, sentinel = remote_code_folder
    with pytest.raises(SeftcError, match="--trust-remote-code"):
        bench_model(str(folder), repeats=1)
    assert not sentinel.exists()


@pytest.mark.parametrize("command", ["generate", "bench", "eval", "pack", "inspect", "export", "prune", "repair", "serve"])
def test_every_loading_command_has_the_flag(command):
    assert "--trust-remote-code" in run(command, "--help").output


def test_repair_refuses_auto_map_without_the_flag(tiny, tmp_path):
    """repair loads its input through the same refusal as every other command."""
    from seftc.repair.api import repair

    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)  # the module's shared model stays as it is
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SeftcError, match="--trust-remote-code"):
        repair(str(folder), output=str(tmp_path / "r"), steps=1)
    assert not (tmp_path / "r").exists()


# --- 8: small files, huge allocations ------------------------------------------------------------------

def rice_bomb() -> PackedTensor:
    """The attack's file: a few values in a rice tensor that claims [8192, 8192] float32. Its
    components are those of a real [8192, 8] tensor (same blocks, same gaps), so every structural
    check passes; only the claimed width is forged."""
    w = torch.zeros(8192, 8)
    w[0, 1], w[100, 3], w[8191, 7] = 1.0, 2.0, 3.0
    p = get_codec("rice").from_dense(w)
    return PackedTensor("rice", (8192, 8192), torch.float32, dict(p.components), dict(p.params))


def test_small_rice_file_claiming_a_large_tensor_is_refused(tmp_path):
    path = forge(tmp_path / "bomb.safetensors", {"w.weight": rice_bomb()})
    assert path.stat().st_size < 2048
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="w.weight.*(expan|justif)"):
        read_all(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing near 256 MiB


@pytest.mark.parametrize("fmt,shape", [("csr", (4, 1 << 26)), ("rice", (64, 1 << 26))])
def test_every_sparse_reader_bounds_the_dense_size_by_the_payload(fmt, shape):
    p = get_codec(fmt).from_dense(torch.tensor([[0.0, 1.0, 0.0, 0.0]] * shape[0]))
    forged = PackedTensor(fmt, shape, torch.float32, dict(p.components), dict(p.params))
    with pytest.raises(FormatError, match="expan|justif"):
        forged.to_dense("x")


def test_absurd_shape_gets_a_cap_error_not_out_of_memory(tiny, tmp_path):
    """A 64 GiB claim: an explicit FormatError before any allocation, in the library and the CLI
    (not a raw MemoryError, not 'out of memory; lower --nsamples')."""
    forged = PackedTensor("csr", (2, 1 << 34), torch.float32, dict(get_codec("csr").from_dense(torch.zeros(2, 3)).components))
    with pytest.raises(FormatError, match="dense"):
        forged.to_dense("x")
    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out)
    tensors["model.layers.0.mlp.up_proj.weight"] = forged
    forge(out / "packed.safetensors", tensors)
    r = run("unpack", str(out), "-o", str(tmp_path / "u"), ok=False)
    assert "nsamples" not in r.output and "dense" in r.output and "up_proj" in r.output


def test_memory_cap_applies_below_the_format_limit(monkeypatch):
    """A shape under the format's 64 GiB limit but beyond this machine's memory is refused up
    front, with the figure, instead of failing in the allocator."""
    from seftc.formats import base

    monkeypatch.setattr(base, "memory_limit", lambda: 1 << 20)
    p = get_codec("bitmask").from_dense(sparse_matrix(512, 1024, 0.5, torch.float32))
    with pytest.raises(FormatError, match="memory"):
        p.to_dense("big")


# --- 10: lying safetensors headers, load_sparse errors -------------------------------------------------

def _lying_files(tmp_path: Path) -> dict[str, bytes]:
    path = forge(tmp_path / "ok.safetensors", {"a": torch.arange(4.0), "b": torch.arange(2.0)})
    data = path.read_bytes()
    header, body = split(data)
    outside = json.loads(json.dumps(header))
    outside["a"]["data_offsets"] = [0, 1000]
    overlap = json.loads(json.dumps(header))
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    overlap[second]["data_offsets"] = overlap[first]["data_offsets"]
    return {
        "empty": b"",
        "short": b"\x10\x00",
        "length beyond file": struct.pack("<Q", 1 << 40) + data[8:],
        "length inside but past end": struct.pack("<Q", len(data)) + data[8:],
        "not JSON": struct.pack("<Q", 8) + b"{notjson" + body,
        "not UTF-8": struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc    " + body,
        "offsets outside": join(outside, body),
        "overlapping offsets": join(overlap, body),
        "truncated body": data[:-3],
    }


def test_lying_safetensors_headers_are_format_errors(tmp_path):
    for what, raw in _lying_files(tmp_path).items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(raw)
        with pytest.raises(FormatError, match="bad.safetensors"):
            read_all(path)
        with pytest.raises(FormatError):
            read_all(path, legacy="ct-sparse-bitmask")


def test_lying_headers_through_the_cli(tiny, tmp_path):
    out = tmp_path / "p"
    run("pack", str(tiny[0]), "-o", str(out))
    good = (out / "packed.safetensors").read_bytes()
    for i, (what, raw) in enumerate(_lying_files(tmp_path).items()):
        (out / "packed.safetensors").write_bytes(raw)
        r = run("unpack", str(out), "-o", str(tmp_path / f"u{i}"), ok=False)
        assert r.output.count("\n") == 1, what
        model = tmp_path / f"m{i}"
        model.mkdir()
        (model / "config.json").write_bytes((tiny[0] / "config.json").read_bytes())
        (model / "model.safetensors").write_bytes(raw)
        r = run("pack", str(model), "-o", str(tmp_path / f"o{i}"), ok=False)
        assert r.output.count("\n") == 1, what
    (out / "packed.safetensors").write_bytes(good)


def test_load_sparse_refuses_a_shape_that_disagrees_with_the_config(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out)
    # a packed weight transposed in the header: same bytes, shape [64, 128] where the model has [128, 64]
    name = "model.layers.0.mlp.up_proj.weight"
    w = tensors[name].to_dense(name)
    tensors[name] = get_codec(tensors[name].format).from_dense(w.reshape(64, 128).contiguous())
    forge(out / "packed.safetensors", tensors)
    with pytest.raises(FormatError, match="shape.*up_proj.*is \\[64, 128\\].*needs \\[128, 64\\]"):
        load_sparse(out)
    with pytest.raises(FormatError, match="shape.*up_proj.*is \\[64, 128\\].*needs \\[128, 64\\]"):
        load_sparse(out, dense=True)


def test_load_sparse_refuses_a_dense_tensor_of_the_wrong_shape(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out)
    tensors["model.norm.weight"] = torch.ones(3)
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.ones(5, 5)
    forge(out / "packed.safetensors", tensors)
    with pytest.raises(FormatError, match="model.layers.1.self_attn.q_proj.weight|model.norm.weight"):
        load_sparse(out)


def test_load_sparse_refuses_an_integer_weight(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    forge(out / "packed.safetensors", tensors)
    with pytest.raises(FormatError, match="model.norm.weight.*int64"):
        load_sparse(out)


def test_load_sparse_refuses_a_weight_where_the_model_has_no_module(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    out = tmp_path / "p"
    tensors = packed_tensors(tiny[0], out)
    tensors["model.layers.7.mlp.up_proj.weight"] = get_codec("bitmask").from_dense(sparse_matrix(4, 8, 0.5, torch.float32))
    forge(out / "packed.safetensors", tensors)
    with pytest.raises(FormatError, match="model.layers.7.mlp.up_proj.weight"):
        load_sparse(out)


def test_load_sparse_config_that_disagrees_with_the_weights(tiny, tmp_path):
    from seftc.formats.sparse_model import load_sparse

    out = tmp_path / "p"
    run("pack", str(tiny[0]), "-o", str(out))
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="shape.*mlp"):
        load_sparse(out)


# --- 12: pack of a packed folder; non-canonical encodings ---------------------------------------------

@pytest.mark.parametrize("fmt", ["auto", "ct-sparse-bitmask"])
def test_pack_of_a_packed_folder_is_refused(tiny, tmp_path, fmt):
    run("pack", str(tiny[0]), "-o", str(tmp_path / "p"), "--format", fmt)
    r = run("pack", str(tmp_path / "p"), "-o", str(tmp_path / "pp"), ok=False)
    assert "already packed; unpack it first or pass the original folder" in r.output
    assert not (tmp_path / "pp").exists()


def test_pack_of_a_packed_folder_without_its_markers_is_refused(tiny, tmp_path):
    """Even with seftc_pack.json and the config block gone, component keys give it away."""
    run("pack", str(tiny[0]), "-o", str(tmp_path / "p"), "--format", "ct-sparse-bitmask")
    (tmp_path / "p" / "seftc_pack.json").unlink()
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("seftc") and k != "quantization_config"}
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    strip_seftc(tmp_path / "p" / "model.safetensors")
    r = run("pack", str(tmp_path / "p"), "-o", str(tmp_path / "pp"), ok=False)
    assert "already packed" in r.output


def test_pack_of_an_unpacked_folder_works(tiny, tmp_path):
    """unpack's output carries seftc container metadata (all dense); that is not 'packed'."""
    run("pack", str(tiny[0]), "-o", str(tmp_path / "p"))
    run("unpack", str(tmp_path / "p"), "-o", str(tmp_path / "u"))
    run("pack", str(tmp_path / "u"), "-o", str(tmp_path / "p2"))


def _with_component(p: PackedTensor, comp: str, t: torch.Tensor) -> PackedTensor:
    return PackedTensor(p.format, p.shape, p.dtype, {**p.components, comp: t}, dict(p.params))


@pytest.mark.parametrize("fmt,values", [("bitmask", "values"), ("csr", "values"), ("rice", "values"), ("ct-sparse-bitmask", "compressed")])
def test_positive_zero_stored_as_a_value_is_rejected(tmp_path, fmt, values):
    w = sparse_matrix(8, 16, 0.5)
    p = get_codec(fmt).from_dense(w)
    v = p.components[values].clone()
    v[1] = 0.0
    bad = _with_component(p, values, v)
    with pytest.raises(FormatError, match=r"\+0\.0"):
        bad.to_dense("w")
    path = forge(tmp_path / "x.safetensors", {"w.weight": bad})
    with pytest.raises(FormatError, match=r"\+0\.0"):
        read_all(path)


def test_non_canonical_24_positions_are_rejected(tmp_path):
    """Group [0, 0, 0, 5]: kept positions must be (0, 3); (1, 3) decodes to the same tensor but is
    a second encoding of it."""
    w = torch.zeros(1, 8, dtype=torch.float16)
    w[0, 3], w[0, 4], w[0, 5] = 5.0, 1.0, 2.0
    p = get_codec("2:4").from_dense(w)
    assert p.components["positions"].tolist() == [[0b11_00 | (0 | 1 << 2) << 4]]  # (0,3), (0,1)
    bad = _with_component(p, "positions", torch.tensor([[0b11_01 | (0 | 1 << 2) << 4]], dtype=torch.uint8))
    assert torch.equal(get_codec("2:4").decode(p), w)
    with pytest.raises(FormatError, match="canonical"):
        bad.to_dense("w")
    path = forge(tmp_path / "x.safetensors", {"w.weight": bad})
    with pytest.raises(FormatError, match="canonical"):
        read_all(path)


def test_non_canonical_ct24_mask_is_rejected_in_seftc_files_only(tmp_path):
    w = torch.zeros(1, 8, dtype=torch.float16)
    w[0, 3], w[0, 4], w[0, 5] = 5.0, 1.0, 2.0
    p = get_codec("ct-sparse-24-bitmask").from_dense(w)
    assert p.components["bitmask"].tolist() == [[0b0011_1001]]
    bad = _with_component(p, "bitmask", torch.tensor([[0b0011_1010]], dtype=torch.uint8))
    path = forge(tmp_path / "model.safetensors", {"w.weight": bad})
    with pytest.raises(FormatError, match="canonical"):
        read_all(path)
    # compressed-tensors picks the kept zeros by topk: its own files may keep other zeros
    foreign = forge(tmp_path / "foreign.safetensors", {"w.weight": bad}, checksums=False)
    assert torch.equal(read_all(foreign, legacy="ct-sparse-24-bitmask")["w.weight"], w)


@pytest.mark.parametrize("k,block_rows", [(5, 64), (1, 32)])
def test_non_canonical_rice_parameters_are_rejected(k, block_rows):
    """The writer's k (the smallest minimising the stream bits) and block_rows 64 are the one
    encoding; another k or block size is a second encoding of the same tensor."""
    from seftc.formats.base import Analysis
    from seftc.formats.rice import RICE, Plan

    w = sparse_matrix(70, 24, 0.2, seed=3)
    assert RICE.from_dense(w).params == {"k": 2, "block_rows": 64}
    a = Analysis(w)
    plan = a._rice_plan = Plan(a, block_rows)
    plan.k = k
    plan.high_bits = int((plan.gaps >> k).sum()) + plan.nnz
    other = RICE.encode(a)
    assert other.params == {"k": k, "block_rows": block_rows}
    with pytest.raises(FormatError, match="canonical"):
        other.to_dense("w")


def test_golden_and_written_files_are_canonical():
    """Decoding then re-encoding reproduces every component: one encoding per tensor."""
    for fmt in ("bitmask", "csr", "rice", "2:4", "ct-sparse-bitmask", "ct-sparse-24-bitmask"):
        for density in (0.0, 0.05, 0.5, 1.0):
            w = sparse_matrix(70, 24, density, seed=7)
            if "24" in fmt or fmt == "2:4":
                w = w.view(70, 6, 4)
                w[..., 2:] = 0
                w = w.view(70, 24)
            p = get_codec(fmt).from_dense(w)
            again = get_codec(fmt).from_dense(p.to_dense("w"))
            assert again.params == p.params
            for c in p.components:
                assert torch.equal(np_bits_t(again.components[c]), np_bits_t(p.components[c])), (fmt, density, c)


def np_bits_t(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np_bits(t).copy().reshape(-1).view(np.uint8))


def test_generate_on_a_foreign_folder_says_it_read_without_checksums(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_dir / "model.safetensors"))
    for name, w in state.items():
        if name.endswith("proj.weight"):
            w.masked_fill_(w.abs() <= w.abs().median(), 0.0)
    folder = write_foreign_ct_folder(tiny_dir, state, tmp_path / "foreign")
    r = run("generate", str(folder), "--prompt", "Shall I", "--max-new-tokens", "2", "--json")
    assert "read without checksums (foreign compressed-tensors folder)" in r.stderr
    assert json.loads(r.stdout)["checksums"] == "none (foreign compressed-tensors folder)"
    packed = tmp_path / "own"
    tiny_dir_pruned = tmp_path / "pruned"
    tiny_dir_pruned.mkdir()
    for side in tiny_dir.iterdir():
        (tiny_dir_pruned / side.name).write_bytes(side.read_bytes())
    save_file(state, str(tiny_dir_pruned / "model.safetensors"), metadata={"format": "pt"})
    run("pack", str(tiny_dir_pruned), "-o", str(packed))
    r = run("generate", str(packed), "--prompt", "Shall I", "--max-new-tokens", "2", "--json")
    assert json.loads(r.stdout)["checksums"] == "verified" and "without checksums" not in r.stderr
