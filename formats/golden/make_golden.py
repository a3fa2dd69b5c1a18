"""Regenerate the golden files of formats/golden/ (deterministic: no RNG library, no time stamps).

    python formats/golden/make_golden.py [--out DIR]

Writes, for every format, `<format>.safetensors` (written by seftc's writer) and
`expected.safetensors` (the same tensors dense, written by the plain safetensors library).
Only regenerate for a deliberate format change: tests/test_formats_golden.py checks that the
readers decode the checked-in files exactly and that this script reproduces them byte for byte.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent
FILES = {  # format -> file name (no ':' in file names)
    "bitmask": "bitmask.safetensors",
    "csr": "csr.safetensors",
    "rice": "rice.safetensors",
    "2:4": "24.safetensors",
    "ct-sparse-bitmask": "ct-sparse-bitmask.safetensors",
    "ct-sparse-24-bitmask": "ct-sparse-24-bitmask.safetensors",
    "bitmask-int8": "bitmask-int8.safetensors",
    "2:4-int8": "24-int8.safetensors",
}
STRUCTURED = ("2:4", "ct-sparse-24-bitmask", "2:4-int8")
QUANTIZED = ("bitmask-int8", "2:4-int8")  # lossy: they decode to the int8 expectation, not to their input
EXPECTED_FILES = ("expected.safetensors", "expected-int8.safetensors")


def prefix(fmt: str) -> str:
    """Where a format's golden tensors sit in the expected files: `[int8-]structured/NAME` or
    `[int8-]unstructured/NAME`."""
    layout = "structured" if fmt in STRUCTURED else "unstructured"
    return f"int8-{layout}" if fmt in QUANTIZED else layout


def _lcg(seed: int):
    state = seed
    while True:
        state = (6364136223846793005 * state + 1442695040888963407) % (1 << 64)
        yield state >> 33


def _matrix(rows: int, cols: int, density: float, seed: int, empty_rows: tuple[int, ...] = ()) -> list[list[float]]:
    rnd = _lcg(seed)
    out = []
    for r in range(rows):
        row = []
        for _ in range(cols):
            keep = next(rnd) % 1000 < density * 1000
            value = ((next(rnd) % 2001) - 1000) / 64 or 1.0
            row.append(value if keep and r not in empty_rows else 0.0)
        out.append(row)
    return out


def _two_four(rows: int, cols: int, seed: int, empty_rows: tuple[int, ...] = ()) -> list[list[float]]:
    """Each group of four gets 0, 1 or 2 non-zeros at varying positions."""
    rnd = _lcg(seed)
    out = []
    for r in range(rows):
        row = [0.0] * cols
        if r not in empty_rows:
            for g in range(cols // 4):
                n = next(rnd) % 3
                first = next(rnd) % 4
                for p in sorted({first, (first + 1 + next(rnd) % 3) % 4})[:n]:
                    row[4 * g + p] = ((next(rnd) % 2001) - 1000) / 64 or 1.0
        out.append(row)
    return out


def _specials(t: torch.Tensor) -> torch.Tensor:
    """Put -0.0, NaN, inf and a subnormal into the first non-empty row: all must survive bit-exactly."""
    flat = t.view(-1)
    nz = flat.ne(0).nonzero().view(-1).tolist()
    specials = [-0.0, math.nan, math.inf, 1e-40 if t.dtype == torch.float32 else 1e-7]
    for i, v in zip(nz[:4], specials):
        flat[i] = v
    return t


def tensors(structured: bool) -> dict[str, torch.Tensor]:
    """The golden tensors: F32, F16 and BF16; widths not divisible by 8; empty rows; >1 rice block."""
    if structured:
        return {
            "f32.weight": _specials(torch.tensor(_two_four(5, 12, 1, empty_rows=(2,)), dtype=torch.float32)),
            "f16.weight": torch.tensor(_two_four(4, 16, 2, empty_rows=(0,)), dtype=torch.float16),
            "bf16.weight": torch.tensor(_two_four(3, 8, 3), dtype=torch.bfloat16),
            "norm.weight": torch.tensor([1.0, -0.5, 0.25, 0.0, 2.0], dtype=torch.float32),
        }
    return {
        "f32.weight": _specials(torch.tensor(_matrix(5, 13, 0.3, 11, empty_rows=(1,)), dtype=torch.float32)),
        "f16.weight": torch.tensor(_matrix(6, 20, 0.5, 12, empty_rows=(0, 5)), dtype=torch.float16),
        "bf16.weight": torch.tensor(_matrix(3, 40, 0.1, 13), dtype=torch.bfloat16),
        "tall.weight": torch.tensor(_matrix(70, 9, 0.2, 14, empty_rows=(64, 65)), dtype=torch.float16),
        "norm.weight": torch.tensor([1.0, -0.5, 0.25, 0.0, 2.0], dtype=torch.float32),
    }


def int8_tensors(structured: bool) -> dict[str, torch.Tensor]:
    """The int8 formats' inputs: the golden tensors with NaN and infinity (which int8 cannot hold)
    replaced by finite values (the large one makes small weights of its row quantize to zero),
    plus a row whose scale would be subnormal (stored as scale 0)."""
    out = {n: torch.nan_to_num(t, nan=0.75, posinf=100.0) for n, t in tensors(structured).items()}
    out["tiny.weight"] = torch.tensor([[0, 1e-37, 0, -3e-37, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0, -0.25, 0.001]], dtype=torch.float32)
    return out


def int8_reference(t: torch.Tensor) -> torch.Tensor:
    """What the int8 formats decode `t` to (formats/int8.md), written from the spec, apart from seftc's code."""
    if t.dim() != 2:
        return t
    x = t.float()
    scale = x.abs().amax(dim=1) / 127
    scale = torch.where(scale >= 2.0 ** -126, scale, torch.zeros_like(scale))
    q = torch.where(scale[:, None] > 0, torch.round(x / torch.where(scale > 0, scale, 1.0)[:, None]), torch.zeros_like(x))
    return (q * scale[:, None] + 0.0).to(t.dtype)  # + 0.0: an int8 zero decodes to +0.0, never -0.0


def expected_int8() -> dict[str, torch.Tensor]:
    out = {}
    for structured, layout in ((False, "unstructured"), (True, "structured")):
        for name, t in int8_tensors(structured).items():
            out[f"int8-{layout}/{name}"] = int8_reference(t)
    return out


def load_expected(folder: Path = GOLDEN) -> dict[str, torch.Tensor]:
    """Every expected tensor, keyed `prefix(fmt)/NAME`."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in EXPECTED_FILES:
        out.update(load_file(str(folder / name)))
    return out


def expected() -> dict[str, torch.Tensor]:
    out = {}
    for structured, prefix in ((False, "unstructured"), (True, "structured")):
        for name, t in tensors(structured).items():
            out[f"{prefix}/{name}"] = t
    return out


def write(out: Path) -> list[Path]:
    from safetensors.torch import save_file

    from seftc.formats.io import save_packed
    from seftc.formats.registry import get_codec

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, filename in FILES.items():
        packed = {}
        source = int8_tensors if fmt in QUANTIZED else tensors
        for name, t in source(fmt in STRUCTURED).items():
            packed[name] = t if t.dim() != 2 else get_codec(fmt).from_dense(t)
        written.append(save_packed(out / filename, packed))
    for name, tensors_ in zip(EXPECTED_FILES, (expected(), expected_int8())):
        save_file(tensors_, str(out / name))
        written.append(out / name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=GOLDEN)
    for path in write(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
