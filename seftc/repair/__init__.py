"""SEFT repair and baselines; `seftc.repair(...)` calls `seftc.repair.api.repair`."""
from seftc._callable import make_callable

make_callable(__name__, "seftc.repair.api:repair")
