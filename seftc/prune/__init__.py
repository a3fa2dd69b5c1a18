"""One-shot pruning; `seftc.prune(...)` calls `seftc.prune.api.prune`."""
from seftc._callable import make_callable

make_callable(__name__, "seftc.prune.api:prune")
