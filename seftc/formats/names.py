"""`seftc pack --quantize`: its values and where it applies. Torch-free, so that the recipe's
config model (and the CLI's option checks) can use it without importing the codecs."""
from __future__ import annotations

QUANTIZE = ("none", "int8")  # `seftc pack --quantize`
INT8_OF = {"2:4": "2:4-int8", "bitmask": "bitmask-int8"}  # the layouts int8 applies to, and their int8 formats


def quantize_problem(fmt: str, quantize: str) -> str | None:
    """Why `--quantize` cannot apply with `--format fmt`, or None."""
    if quantize not in QUANTIZE:
        return f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}"
    if quantize == "int8" and fmt != "auto" and fmt not in INT8_OF:
        return (f"--quantize int8 applies to the {' and '.join(INT8_OF)} layouts, not to --format {fmt}; "
                f"use --format auto, {' or '.join(INT8_OF)}")
    return None
