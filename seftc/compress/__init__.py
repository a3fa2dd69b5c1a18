"""The whole pipeline; `seftc.compress(...)` calls `seftc.compress.pipeline.compress`."""
from seftc._callable import make_callable

make_callable(__name__, "seftc.compress.pipeline:compress")
