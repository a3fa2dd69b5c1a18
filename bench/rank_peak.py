"""`python bench/rank_peak.py DIR seftc-args...`: run `seftc ARGS` in this very process and, when it
exits, write this process's own peak RSS (ru_maxrss of RUSAGE_SELF) to DIR/rank-RANK.json.

Under `torchrun` every rank runs this script, so each rank's file holds that rank's peak (the
launcher's own ru_maxrss, or RUSAGE_CHILDREN's maximum over the ranks, would not tell the ranks
apart). Used by bench_scale.py for the per-rank peak of `repair --fsdp`.
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path


def _write(folder: Path, rank: int) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    (folder / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": peak}) + "\n")


def main() -> None:
    folder, args = Path(sys.argv[1]), sys.argv[2:]
    folder.mkdir(parents=True, exist_ok=True)
    atexit.register(_write, folder, int(os.environ.get("RANK", "0")))  # runs after the command's SystemExit too
    sys.argv = ["seftc", *args]
    from seftc.cli.main import main as seftc

    seftc()


if __name__ == "__main__":
    main()
