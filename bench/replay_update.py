"""Replay one SEFT topology update under each eviction score (issue 16's audit, reproduced).

Protocol: prune the model with Wanda (`--sparsity`, calibration `--calib`), train SEFT for
`--steps-in` steps with the tuned settings (ρ 0.10, gradient-initialised η, lr 2e-3, the
schedule of a `--total-steps` run), then take one topology update whose eviction (prune-back) is
scored by each of `--scores`, and measure the held-out loss just before and just after applying it
on `--windows` fixed windows of an in-domain text (`--in-data`) and an out-of-domain one
(`--out-data`). Every score replays the same run: training, growth decisions and the loss before
the update are identical (the window statistics only observe), so the rows differ only in what
was evicted. `--reactivation always` (the default) grows the same positions under every score, so
each evicts the same number of positions; `gain` lets the cost decide how many.

Each replay is one `seftc.repair.api.repair` call stopped after the update step, with the
per-update damage log on (`damage_windows`); the table goes to stdout and, with `--name`, to
results/NAME.md and results/NAME.json. On SmolLM2-135M: a few minutes per score on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("last", "window", "fisher", "wanda", "magnitude", "random")
LABELS = {"last": "|W ⊙ g| of the last batch", "window": "|W ⊙ g| averaged over the window", "fisher": "Fisher / OBD ½ W² · mean g²",
          "wanda": "Wanda score |W|·‖X‖ (per layer)", "magnitude": "magnitude |W|", "random": "random"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model to prune (default: the embedded SmolLM2-135M)")
    ap.add_argument("--pruned", default=None, help="an already pruned folder (skips pruning)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "replay-update"), help="folder for the pruned model")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--calib", default="shakespeare:calib")
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--data", default="shakespeare:train")
    ap.add_argument("--in-data", default="shakespeare:valid")
    ap.add_argument("--out-data", default="commonsense:valid")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows per text")
    ap.add_argument("--steps-in", type=int, default=9, help="training steps before the update step")
    ap.add_argument("--total-steps", type=int, default=140, help="the run the schedule belongs to")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--scores", default=",".join(SCORES))
    ap.add_argument("--reactivation", default="always", choices=["always", "gain"])
    ap.add_argument("--options", default='{"lr": 0.002, "density": 0.1, "init": "gradient"}',
                    help="further repair options (JSON), e.g. caps: '{\"row_cap\": 0.02}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="write results/NAME.md and results/NAME.json")
    ap.add_argument("--results-dir", default=str(ROOT / "results"))
    return ap.parse_args(argv)


def pruned_folder(args: argparse.Namespace) -> str:
    from seftc.prune.api import prune

    if args.pruned:
        return args.pruned
    out = Path(args.work) / f"pruned-{args.sparsity}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out / "seftc_manifest.json").is_file():
        prune(args.model, method="wanda", sparsity=args.sparsity, output=out, force=True,
              calib={"source": args.calib, "nsamples": args.calib_n, "seqlen": args.calib_seqlen})
    return str(out)


# The audit's setting, whatever SEFT's defaults are: no caps, no δ decay, reactivation until the end (--options adds to it)
AUDIT = {"row_cap": None, "reactivation_cap": None, "delta_decay": 0.0, "reactivation_stop": 1.0}


def replay(src: str, score: str, args: argparse.Namespace) -> dict:
    from seftc.repair.api import repair

    options = {**AUDIT, **json.loads(args.options)}
    interval = args.steps_in + 1  # the update is decided in step steps_in's backward, applied after its optimizer step
    result = repair(src, method="seft", steps=args.total_steps, update_interval=interval, accumulation=min(5, interval),
                    evict_score=score, reactivation=args.reactivation, data=args.data, eval_data=args.in_data, ood_data=args.out_data,
                    damage_windows=args.windows, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed, eval_every=0,
                    stop_after=interval, **options)
    (damage,) = result.history["update_damage"]
    (update,) = result.history["updates"]
    return {"score": score, **damage, "evicted": update["evicted"], "regrown": update["regrown"], "rows_emptied": update["rows_emptied"]}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    first = rows[0]
    lines = [f"## One SEFT update replayed per eviction score (Wanda {args.sparsity:.0%}, {args.steps_in} steps in, "
             f"reactivation {args.reactivation})", "",
             f"Held-out loss before the update: in-domain ({args.in_data}) {first['in_before']:.4f}, "
             f"out-of-domain ({args.out_data}) {first['out_before']:.4f}; {args.windows} windows of {args.seqlen} tokens each.", "",
             "| eviction score | evicted | rows emptied | loss in | Δ in | loss out | Δ out |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['score'], r['score'])} | {r['evicted']} | {r['rows_emptied']} | {r['in_after']:.4f} | "
                     f"{r['in_after'] - r['in_before']:+.4f} | {r['out_after']:.4f} | {r['out_after'] - r['out_before']:+.4f} |")
    lines += ["", f"Options: {args.options}; data {args.data}, seed {args.seed}, batch {args.batch_size} × {args.seqlen}.", "",
              __doc__.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    src = pruned_folder(args)
    rows = []
    for score in args.scores.split(","):
        rows.append(replay(src, score, args))
        print(f"[replay-update] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    text = render(rows, args)
    print(text)
    if args.name:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(text)
        (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
