"""Issue 11, loading and OS side: weights that do not match their config are refused (never a random
model), side files are read bounded and never through links out of the folder, kernel builds and
outputs are locked by locks that die with their holder, OS errors (full disk, permissions, names)
are one line, and an output may sit beside a .gguf or .safetensors input."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from seftc.errors import SeftcError

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
FAST = ["--method", "magnitude"]


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args) -> Ran:
    """The seftc CLI in this process (fast: torch and transformers are imported once)."""
    from click.testing import CliRunner

    from seftc.cli.main import cli as group

    r = CliRunner().invoke(group, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Ran(r.exit_code, r.stdout, r.stderr)


def cli(*args, timeout: float = 300, preexec_fn=None) -> Ran:
    """The seftc CLI in a subprocess (argv may hold bytes: non-UTF-8 names; limits; signals)."""
    argv = [sys.executable, "-m", "seftc.cli.main", *(a if isinstance(a, bytes) else str(a) for a in args)]
    r = subprocess.run(argv, capture_output=True, timeout=timeout, preexec_fn=preexec_fn)
    return Ran(r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


def one_error_line(r: Ran, *expect: str) -> str:
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def hold_lock_elsewhere(out: Path) -> subprocess.Popen:
    """Another process (light: no torch) holding OUT's lock, as a concurrent run does."""
    code = ("import time; from seftc.models.saving import lock_output; "
            f"lock_output({str(out)!r}); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---- item 3: weights that did not come from the file ----------------------------------------

def test_wrong_architecture_is_refused_naming_the_keys(tiny_dir, tmp_path):
    """model_type gpt_neox on LLaMA weights: 0 shared keys; was a freshly initialised model, exit 0."""
    m = copy_model(tiny_dir, tmp_path / "m")
    edit_config(m, model_type="gpt_neox")
    line = one_error_line(run("prune", m, "-o", tmp_path / "out", *FAST), "does not match its config (gpt_neox)")
    assert "weights missing from the file" in line and "gpt_neox.embed_in.weight" in line
    assert "unused by the config" in line and "model.embed_tokens.weight" in line and "in all)" in line
    assert not (tmp_path / "out").exists()


def test_encoder_architecture_is_refused(tiny_dir, tmp_path):
    m = copy_model(tiny_dir, tmp_path / "m")
    edit_config(m, model_type="bert")
    one_error_line(run("prune", m, "-o", tmp_path / "out", *FAST), "'bert' is an encoder", "decoder-only")
    from seftc.models.loading import load_model

    with pytest.raises(SeftcError, match="encoder"):
        load_model(m)


def test_mis_shaped_weights_are_refused_naming_the_keys(tiny_dir, tmp_path):
    m = copy_model(tiny_dir, tmp_path / "m")
    edit_config(m, intermediate_size=96)
    line = one_error_line(run("inspect", m), "weights with another shape")
    assert "mlp.down_proj.weight (file [64, 128], config [64, 96])" in line
    line = one_error_line(run("prune", m, "-o", tmp_path / "out", *FAST))  # prune streams the checkpoint: its own check
    assert "mlp." in line and "96" in line
    assert not (tmp_path / "out").exists()


def test_single_safetensors_file_refuses_missing_and_unexpected_keys(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from seftc.models.loading import load_model

    m = copy_model(tiny_dir, tmp_path / "m")
    state = load_file(str(m / "model.safetensors"))
    dropped = dict(state)
    dropped.pop("model.layers.1.mlp.up_proj.weight")
    save_file(dropped, str(m / "dropped.safetensors"))
    with pytest.raises(SeftcError, match=r"1 weights missing from the file \(model.layers.1.mlp.up_proj.weight\)"):
        load_model(m / "dropped.safetensors")
    extra = {**state, "model.layers.9.extra.weight": state["model.norm.weight"].clone()}
    save_file(extra, str(m / "extra.safetensors"))
    with pytest.raises(SeftcError, match="unused by the config"):
        load_model(m / "extra.safetensors")
    loaded = load_model(m / "model.safetensors")  # the complete file still loads, bit for bit
    assert all((loaded.model.state_dict()[k] == v).all() for k, v in state.items())


def test_sharded_folder_loads_and_a_shard_missing_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from conftest import build_tiny_model, tiny_tokenizer
    from seftc.models.loading import load_model

    m = tmp_path / "sharded"
    build_tiny_model().save_pretrained(m, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(m)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    load_model(m)
    key, shard = "lm_head.weight", index["weight_map"]["lm_head.weight"]
    state = load_file(str(m / shard))
    state.pop(key)
    save_file(state, str(m / shard), metadata={"format": "pt"})
    one_error_line(run("inspect", m), "does not match its config (llama): 1 weights missing from the file (lm_head.weight)")


def test_untied_lm_head_may_not_be_missing_but_a_tied_one_may(tmp_path):
    """The tied output embedding is the only weight allowed to be absent, and only when tied."""
    import torch
    from transformers import AutoModelForCausalLM

    from seftc.models.loading import _state_dict_info, check_loaded_weights
    from conftest import tiny_config

    for tie in (False, True):
        config = tiny_config("llama")
        config.tie_word_embeddings = tie
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        info = _state_dict_info(model, state, config)
        if tie:
            check_loaded_weights(info, "x.gguf", config)
        else:
            with pytest.raises(SeftcError, match=r"1 weights missing from the file \(lm_head.weight\)"):
                check_loaded_weights(info, "x.gguf", config)


def test_loading_info_errors_name_a_few_keys_and_the_count():
    from seftc.models.loading import check_loaded_weights

    info = {"missing_keys": {f"k{i}" for i in range(7)}, "unexpected_keys": set(), "mismatched_keys": [], "error_msgs": []}
    with pytest.raises(SeftcError, match=r"7 weights missing from the file \(k0, k1, k2, … \(7 in all\)\)"):
        check_loaded_weights(info, "m", type("C", (), {"model_type": "llama"})())


# ---- items 8 and 10: bad weight files, side files, memory --------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _claim_64_gib(header: dict) -> None:
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [262144, 65536]
    header[key]["data_offsets"] = [0, 262144 * 65536 * 4]


@pytest.mark.parametrize("damage,expect", [
    ("empty", "the file is empty"),
    ("truncated", "invalid header length"),
    ("lying", "invalid offset"),
    ("huge-header", "header too large"),
])
def test_broken_safetensors_in_a_model_folder_is_one_line(damage, expect, tiny_dir, tmp_path):
    m = copy_model(tiny_dir, tmp_path / "m")
    weights = m / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        os.truncate(weights, 1000)
    elif damage == "lying":
        _rewrite_header(weights, _claim_64_gib)
    else:
        weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    one_error_line(run("prune", m, "-o", tmp_path / "out", *FAST), "model.safetensors")  # prune streams: its own reader
    for args in (("inspect", m), ("eval", m, "--limit", "1")):
        one_error_line(run(*args), "model.safetensors is not a valid safetensors file", expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_gguf_is_one_line(tmp_path):
    """A GGUF cut at 100 bytes raised struct.error with a traceback."""
    gguf = tmp_path / "cut.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    key = b"general.architecture"
    gguf.write_bytes((header + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, 5) + b"llama" + b"\0" * 200)[:100])
    one_error_line(run("inspect", gguf), "cannot load GGUF file", "complete GGUF")


def test_config_linked_to_dev_zero_is_refused_not_read(tiny_dir, tmp_path):
    """config.json -> /dev/zero was read until memory ran out."""
    m = copy_model(tiny_dir, tmp_path / "m")
    (m / "config.json").unlink()
    (m / "config.json").symlink_to("/dev/zero")
    for args in (("prune", m, "-o", tmp_path / "out", *FAST), ("pack", m, "-o", tmp_path / "p"), ("inspect", m)):
        one_error_line(run(*args), "config.json is a link to /dev/zero, outside the model folder")


def test_side_files_must_be_regular_and_bounded(tiny_dir, tmp_path):
    from seftc.models.files import SIDE_FILE_LIMIT
    from seftc.models.loading import resolve_model

    m = copy_model(tiny_dir, tmp_path / "m")
    os.truncate(m / "tokenizer.json", SIDE_FILE_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(SeftcError, match="tokenizer.json is 64 MiB, more than a side file may be"):
        resolve_model(m)
    (m / "tokenizer.json").unlink()
    os.mkfifo(m / "tokenizer.json")  # a reader would block on it forever
    with pytest.raises(SeftcError, match="tokenizer.json is not a regular file"):
        resolve_model(m)


def test_packed_folder_with_config_linked_to_dev_zero_is_refused(tiny_dir, tmp_path):
    from seftc.formats.packing import pack_folder
    from seftc.formats.sparse_model import load_sparse
    from seftc.prune.api import prune

    prune(tiny_dir, method="magnitude", sparsity=0.5, output=tmp_path / "pruned")
    pack_folder(tmp_path / "pruned", tmp_path / "packed")
    (tmp_path / "packed" / "config.json").unlink()
    (tmp_path / "packed" / "config.json").symlink_to("/dev/zero")
    with pytest.raises(SeftcError, match="link to /dev/zero"):
        load_sparse(tmp_path / "packed")
    one_error_line(run("generate", tmp_path / "packed", "--prompt", "hi"), "link to /dev/zero")


def test_pack_does_not_copy_links_out_of_the_folder(tiny_dir, tmp_path):
    """A symlinked notes.txt -> /etc/hostname was copied into the pack output."""
    from seftc.formats.packing import pack_folder, unpack_folder
    from seftc.prune.api import prune

    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model folder\n")
    prune(tiny_dir, method="magnitude", sparsity=0.5, output=tmp_path / "pruned")
    pruned = tmp_path / "pruned"
    (pruned / "notes.txt").symlink_to(secret)
    (pruned / "readme.txt").write_text("inside\n")
    (pruned / "readme-link.txt").symlink_to("readme.txt")  # a link within the folder is fine
    r = run("pack", pruned, "-o", tmp_path / "packed")
    assert r.returncode == 0, r.stderr
    assert "not copied" in r.stderr and "notes.txt" in r.stderr
    out = tmp_path / "packed"
    assert not (out / "notes.txt").exists()
    assert (out / "readme.txt").read_text() == "inside\n"
    assert (out / "readme-link.txt").read_text() == "inside\n" and not (out / "readme-link.txt").is_symlink()
    result = pack_folder(pruned, tmp_path / "packed2")
    assert any("notes.txt" in w for w in result.warnings)
    (out / "stolen.txt").symlink_to(secret)
    unpack_folder(out, tmp_path / "dense")
    assert not (tmp_path / "dense" / "stolen.txt").exists() and (tmp_path / "dense" / "readme.txt").is_file()


def test_hub_cache_snapshot_links_are_followed(tiny_dir, tmp_path):
    """Hugging Face's cache links snapshot files into ../../blobs: that layout still loads."""
    from seftc.models.loading import load_model

    repo = tmp_path / "models--x--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        shutil.copy2(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert load_model(snap).tokenizer is not None


def test_memory_errors_say_what_happened_not_nsamples(capsys):
    """A 64 GiB claim gave "out of memory; lower --nsamples/--seqlen" in any command."""
    import torch

    from seftc.cli.common import user_errors

    def alloc():
        torch.empty(2**40, dtype=torch.uint8)

    def python_memory():
        raise MemoryError()

    for fn, expect in ((alloc, "out of memory allocating 1024.00 GiB"), (python_memory, "out of memory;")):
        with pytest.raises(SystemExit) as e:
            user_errors(fn)()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expect in err and "nsamples" not in err and "\n" not in err


# ---- item 9: kernel builds --------------------------------------------------------------------

def _kernel_cache(tmp_path: Path) -> Path:
    """A private SEFTC_CACHE holding a complete build of the CPU kernels (copied, not rebuilt)."""
    from seftc.runtime import cpu

    if not cpu.load():
        pytest.skip("the CPU kernels cannot be built here")
    _, _, folder = cpu.extension_folder()
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache / "kernels" / folder.name, ignore=shutil.ignore_patterns("lock", ".seftc-build.lock"))
    return cache


LOAD = "from seftc.runtime import cpu; import sys; sys.exit(0 if cpu.load() else 1)"


def test_a_killed_build_does_not_hang_later_runs(tmp_path):
    """torch's `lock` baton left by a killed build made every later load wait forever."""
    cache = _kernel_cache(tmp_path)
    folder = next((cache / "kernels").iterdir())
    (folder / "lock").write_text("")  # what a build killed inside torch's loader leaves
    r = subprocess.run([sys.executable, "-c", LOAD], env={**os.environ, "SEFTC_CACHE": str(cache)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "removed a stale build lock" in r.stderr
    assert not (folder / "lock").exists()


def test_a_build_lock_holder_killed_with_sigkill_frees_the_next_build(tmp_path):
    """A holder mid-build (our lock held, torch's baton present) is killed -9: the waiter proceeds."""
    cache = _kernel_cache(tmp_path)
    folder = next((cache / "kernels").iterdir())
    env = {**os.environ, "SEFTC_CACHE": str(cache)}
    holder_code = ("import sys, time; from pathlib import Path; from seftc.runtime import cpu\n"
                   f"folder = Path({str(folder)!r})\n"
                   "with cpu.build_lock(folder, 'test'):\n"
                   "    (folder / 'lock').write_text('')\n"
                   "    print('holding', flush=True)\n"
                   "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stderr=subprocess.PIPE, text=True)
        line = waiter.stderr.readline()
        assert "waiting for another process's CPU sparse kernels build" in line and f"pid {holder.pid}" in line
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        _, rest = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, rest
        assert "removed a stale build lock" in rest
    finally:
        holder.kill()


def test_a_live_torch_build_lock_is_waited_for_not_removed(tmp_path):
    """A build by a process without seftc's lock (an older seftc) holds torch's baton open: the
    next load waits for it instead of removing it under the running build."""
    cache = _kernel_cache(tmp_path)
    baton = next((cache / "kernels").iterdir()) / "lock"
    holder_code = ("import os, sys\n"
                   f"fd = os.open({str(baton)!r}, os.O_CREAT | os.O_EXCL)\n"
                   "print('holding', flush=True)\n"
                   "sys.stdin.readline()\n"
                   f"os.close(fd); os.remove({str(baton)!r})\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "SEFTC_CACHE": str(cache)},
                                  stderr=subprocess.PIPE, text=True)
        line = waiter.stderr.readline()
        assert f"pid {holder.pid}, torch's lock" in line, line
        assert baton.exists()
        holder.communicate("go\n", timeout=60)
        _, rest = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, rest
        assert "removed a stale build lock" not in rest
    finally:
        holder.kill()


# ---- item 10: OS-level failures ---------------------------------------------------------------

def test_non_utf8_paths_are_one_line(tiny_dir, tmp_path):
    bad = os.fsencode(tmp_path) + b"/m\xff"
    os.makedirs(bad)
    for f in tiny_dir.iterdir():
        shutil.copy2(f, os.fsdecode(bad + b"/" + os.fsencode(f.name)))
    one_error_line(cli("inspect", bad), "not valid UTF-8", "\\xff")
    one_error_line(cli("prune", tiny_dir, "-o", os.fsencode(tmp_path) + b"/o\xff", *FAST), "not valid UTF-8")
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"m\xff"]


@pytest.mark.parametrize("command", ["prune", "pack", "unpack", "export", "repair"])
def test_every_output_is_validated_before_work(command, tiny_dir, tmp_path):
    out = tmp_path / "missing" / "out"
    one_error_line(run(command, tiny_dir, "-o", out), f"the parent folder of {out} does not exist")


def test_bench_plot_into_a_missing_folder_fails_before_the_benchmark(tiny_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import seftc.runtime.bench as bench
    import seftc.runtime.convert as convert
    from seftc.cli.main import cli as group

    def must_not_run(*a, **k):
        raise AssertionError("the benchmark ran before the --plot path was checked")

    monkeypatch.setattr(convert, "load_runtime_pair", must_not_run)
    monkeypatch.setattr(bench, "run_bench", must_not_run)
    for plot, expect in ((tmp_path / "missing" / "x.png", "does not exist"), (tmp_path / "x.nope", "cannot write .nope")):
        r = CliRunner().invoke(group, ["bench", str(tiny_dir), "--plot", str(plot)])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command", ["prune", "pack"])
def test_full_disk_is_one_line_and_leaves_nothing(command, tiny_dir, tmp_path):
    """A full disk (EFBIG under a file size limit, like ENOSPC) exited 1 with a traceback."""
    from seftc.prune.api import prune

    src = tiny_dir
    if command == "pack":
        src = tmp_path / "pruned"
        prune(tiny_dir, method="magnitude", sparsity=0.5, output=src)
    parent = tmp_path / "outs"
    parent.mkdir()
    r = cli(command, src, "-o", parent / "out", "--json", *(FAST if command == "prune" else ()), preexec_fn=_limit_file_size(50_000))
    one_error_line(r, f"no space left on the device of {parent} writing out (file size limit reached)")
    assert list(parent.iterdir()) == []  # no output, no .tmp-*, no lock file


def test_os_errors_map_to_one_line(capsys):
    from seftc.cli.common import user_errors

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"), "no space left on the device of /data/out/model.safetensors"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "permission denied: /ro/run"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro"), "/mnt/ro is on a read-only file system"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), "file name too long"),
        (RuntimeError("I/O error: File too large (os error 27)"), "no space left"),
    ]
    for exc, expect in cases:
        def raise_it(exc=exc):
            raise exc
        with pytest.raises(SystemExit) as e:
            user_errors(raise_it)()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expect in err and err.count("\n") == 1, err
    with pytest.raises(OSError):  # an OS error that is not the user's to fix keeps its traceback
        user_errors(lambda: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_line(tiny_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        one_error_line(cli("compress", tiny_dir, "-o", run, "--set", "repair=false"), "cannot write into the run folder")
    finally:
        run.chmod(0o755)


def test_atomic_folder_puts_a_replaced_output_back_when_the_swap_fails(tmp_path, monkeypatch):
    from seftc.models import saving

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(saving.os, "replace", flaky)
    with pytest.raises(OSError):
        with saving.atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old"


# ---- item 11: outputs beside a file input -------------------------------------------------------

def test_output_beside_a_gguf_or_safetensors_input_is_allowed(tmp_path):
    from seftc.models.saving import check_output, release_output

    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    gguf = models / "x.gguf"
    gguf.write_bytes(b"GGUF")
    for ok in (models / "x-50", models / "sub" / "x"):  # was "would overwrite the input model"
        release_output(check_output(ok, False, (gguf,)))
    for bad in (gguf, models, tmp_path):  # the file itself, or a folder holding it
        with pytest.raises(SeftcError, match="would overwrite the input model"):
            check_output(bad, True, (gguf,))
    st = models / "model.safetensors"
    st.write_bytes(b"")
    with pytest.raises(SeftcError, match="would overwrite the input model"):  # its folder holds config.json
        check_output(models, True, (st,))
    release_output(check_output(models / "pruned", False, (st,)))
    assert sorted(p.name for p in models.iterdir()) == ["model.safetensors", "sub", "x.gguf"]


def test_prune_a_safetensors_file_into_a_folder_beside_it(tiny_dir, tmp_path):
    m = copy_model(tiny_dir, tmp_path / "m")
    r = run("prune", m / "model.safetensors", "-o", m / "pruned", *FAST)
    assert r.returncode == 0, r.stderr
    assert (m / "pruned" / "model.safetensors").is_file() and (m / "config.json").is_file()
    one_error_line(run("prune", m / "model.safetensors", "-o", m, "--force", *FAST), "would overwrite the input model")


def test_output_beside_a_gguf_is_not_refused_as_overwriting(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "x.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    line = one_error_line(run("prune", models / "x.gguf", "-o", models / "x-50", *FAST))
    assert "overwrite" not in line and "GGUF" in line


# ---- item 12: concurrent runs and leftovers -----------------------------------------------------

def test_second_run_into_a_locked_output_fails_at_once(tiny_dir, tmp_path):
    out = tmp_path / "out"
    holder = hold_lock_elsewhere(out)
    try:
        for args in (("pack", tiny_dir, "-o", out), ("prune", tiny_dir, "-o", out, *FAST),
                     ("compress", tiny_dir, "-o", out, "--set", "repair=false")):
            one_error_line(run(*args), f"another seftc run is writing {out} (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # the killed holder's (reused by the next run)
    r = run("prune", tiny_dir, "-o", out, *FAST)  # its lock died with it
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_packs_started_together_one_wins(tiny_dir, tmp_path):
    """Two packs into one new output both exited 0, one's summary describing the other's files."""
    from seftc.prune.api import prune

    prune(tiny_dir, method="magnitude", sparsity=0.5, output=tmp_path / "pruned")
    argv = lambda fmt: [sys.executable, "-m", "seftc.cli.main", "pack", str(tmp_path / "pruned"), "-o", str(tmp_path / "out"),
                        "--format", fmt, "--json"]
    runs = [subprocess.Popen(argv(fmt), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for fmt in ("bitmask", "csr")]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in runs]
    ok = [r for r in results if r[0] == 0]
    assert len(ok) == 1, results
    failed = next(r for r in results if r[0] != 0)
    assert failed[0] == 2 and ("another seftc run is writing" in failed[2] or "already exists" in failed[2]), failed
    summary = json.loads(ok[0][1])
    manifest = json.loads((tmp_path / "out" / "seftc_pack.json").read_text())
    assert manifest["format"] == summary["format"]


def test_stale_temporaries_of_dead_runs_are_cleaned_and_nothing_else(tiny_dir, tmp_path):
    from seftc import locking
    from seftc.prune.api import prune

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead_id = locking.identity(dead.pid)
    dead.kill()
    dead.wait()
    parent = tmp_path / "outs"
    parent.mkdir()
    stale = parent / f".old-run.tmp-seftc-{dead_id}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    stale_file = parent / f".plot.png.tmp-seftc-{dead_id}-q1w2.png"
    stale_file.write_bytes(b"x")
    alive = parent / f".other.tmp-seftc-{locking.identity()}-def456"  # this process still runs
    alive.mkdir()
    mine = [parent / ".data.tmp-mine", parent / "x.tmp-seftc-1-2-abc", parent / ".notes.tmp-seftc-x"]  # not seftc's pattern
    for p in mine:
        p.mkdir()
    reused = parent / f".reused.tmp-seftc-{os.getpid()}-1-abc"  # a pid alive now but started at another time: stale
    reused.mkdir()
    prune(tiny_dir, method="magnitude", sparsity=0.5, output=parent / "pruned")
    assert not stale.exists() and not stale_file.exists() and not reused.exists()
    assert alive.exists() and all(p.exists() for p in mine)
    assert sorted(p.name for p in parent.iterdir() if not p.name.startswith(".")) == ["pruned", "x.tmp-seftc-1-2-abc"]


def test_compress_holds_its_run_folder(tiny_dir, tmp_path):
    """Two compress runs in one run folder left a report.json disagreeing with recipe.yaml."""
    from seftc.compress.pipeline import compress

    run_dir = tmp_path / "run"
    quick = ["repair=false", "export=false", "bench=false", "eval=false", "prune.method=magnitude"]
    holder = hold_lock_elsewhere(run_dir)
    try:
        with pytest.raises(SeftcError, match=f"another seftc run is writing {run_dir} \\(pid {holder.pid}\\)"):
            compress(tiny_dir, run_dir=run_dir, overrides=quick)
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "recipe.yaml").exists()
    result = compress(tiny_dir, run_dir=run_dir, overrides=quick)  # the lock died with its holder
    assert result.report and not (tmp_path / ".run.lock").exists()
