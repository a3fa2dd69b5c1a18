#!/usr/bin/env bash
# SEFT v2 validation (issue 16): Wanda 70% (and 2:4 below), 40 steps, seed 0, static vs seft-noregrow vs SEFT v1 (last-batch
# eviction, no caps) vs three SEFT v2 variants; perplexity on validation text only (shakespeare:valid in-domain,
# commonsense:valid out). ~50 min on 2 quiet cores (two runs at a time). Writes results/repair-val40.md and .json.
# Every row's options are written out in full (the SEFT defaults changed to the validated v2 variant, fcp, since):
# V1 is the v1 behaviour, and the variants add to it. BENCH_LEGACY_ROWS=1 redraws the table from rows cached
# before they recorded their settings.
set -euo pipefail
cd "$(dirname "$0")/.."
S='"lr": 0.002, "density": 0.1, "init": "gradient", "update_interval": 10'
V1="$S, \"reactivation\": \"gain\", \"evict_score\": \"last\", \"row_cap\": null, \"reactivation_cap\": null, \"delta_decay\": 0.0, \"reactivation_stop\": 1.0"
FC="$V1, \"evict_score\": \"fisher\", \"row_cap\": 0.02, \"reactivation_cap\": 0.005"
FCP="$FC, \"delta_decay\": 2.0, \"reactivation_stop\": 0.75"
export PYTHONPATH=$PWD
BENCH_STEPS=40 BENCH_PATTERNS=0.7 BENCH_METHODS=static,seft-noregrow,seft,seft@fc,seft@fcp,seft@fcb,seft@fcpw BENCH_SEEDS=0 BENCH_DENSE_REF=0 \
BENCH_TASKS= BENCH_PPL_WINDOWS=16 BENCH_PPL_SOURCES=shakespeare:valid,commonsense:valid BENCH_JOBS=2 \
BENCH_DAMAGE_WINDOWS=2 BENCH_NAME=repair-val40 BENCH_DIR=runs/val40 BENCH_RESULTS_DIR=results \
BENCH_SETTINGS="{\"static\": {\"lr\": 0.001}, \"seft-noregrow\": {$V1}, \"seft\": {$V1}, \"seft@fc\": {$FC}, \"seft@fcp\": {$FCP}, \"seft@fcb\": {$FC, \"evict_blend\": 0.5}, \"seft@fcpw\": {$FCP, \"evict_score\": \"window\"}}" \
.venv/bin/python bench/bench_repair.py
# 2:4 (session 8): fcp against fcpw (window-mean |W·g| eviction: the gain rule's own units, so it binds), seft-noregrow
# with fcp's options, and static; results/repair-val40-nm.md. The 2:4 model is bench-repair-140's (same calibration).
[ -e runs/val40/pruned-2of4 ] || { [ -d runs/bench-repair-140/pruned-2of4 ] && ln -s ../bench-repair-140/pruned-2of4 runs/val40/pruned-2of4; } || true
BENCH_STEPS=40 BENCH_PATTERNS=2:4 BENCH_METHODS=seft@fcp,seft@fcpw,seft-noregrow,static BENCH_SEEDS=0 BENCH_DENSE_REF=0 \
BENCH_TASKS= BENCH_PPL_WINDOWS=16 BENCH_PPL_SOURCES=shakespeare:valid,commonsense:valid BENCH_JOBS=2 \
BENCH_DAMAGE_WINDOWS=2 BENCH_NAME=repair-val40-nm BENCH_DIR=runs/val40 BENCH_RESULTS_DIR=results \
BENCH_SETTINGS="{\"static\": {\"lr\": 0.001}, \"seft-noregrow\": {$FCP}, \"seft@fcp\": {$FCP}, \"seft@fcpw\": {$FCP, \"evict_score\": \"window\"}}" \
.venv/bin/python bench/bench_repair.py
# Capacity (session 9): SEFT at ρ 0.3 — as many trainable values as static's active weights at 70% (31.85 M; static
# trains 53.08 M at 2:4) — at lr 2e-3 and 1e-3, beside fcpw at ρ 0.1 and static; results/repair-val40-rho.md.
FCPW="$FCP, \"evict_score\": \"window\""
BENCH_STEPS=40 BENCH_PATTERNS=0.7,2:4 BENCH_METHODS=static,seft@fcpw,seft@r30,seft@r30l BENCH_SEEDS=0 BENCH_DENSE_REF=0 \
BENCH_TASKS= BENCH_PPL_WINDOWS=16 BENCH_PPL_SOURCES=shakespeare:valid,commonsense:valid BENCH_JOBS=2 \
BENCH_DAMAGE_WINDOWS=2 BENCH_NAME=repair-val40-rho BENCH_DIR=runs/val40 BENCH_RESULTS_DIR=results \
BENCH_SETTINGS="{\"static\": {\"lr\": 0.001}, \"seft@fcpw\": {$FCPW}, \"seft@r30\": {$FCPW, \"density\": 0.3}, \"seft@r30l\": {$FCPW, \"density\": 0.3, \"lr\": 0.001}}" \
.venv/bin/python bench/bench_repair.py
# LoRA baselines' learning rate (session 10): masked LoRA (SQFT-like) and LoRA-merge at their default rank, lr 5e-4
# (the untuned default so far) up to 2e-2, beside static; the same validation texts and budget as every method
# above (static's lr and SEFT's options were chosen the same way); results/repair-val40-lora.md.
LORA="\"masked-lora@lr5e-4\": {\"lr\": 0.0005}, \"masked-lora@lr1e-3\": {\"lr\": 0.001}, \"masked-lora@lr2e-3\": {\"lr\": 0.002}, \
\"masked-lora@lr5e-3\": {\"lr\": 0.005}, \"lora-merge@lr5e-4\": {\"lr\": 0.0005}, \"lora-merge@lr1e-3\": {\"lr\": 0.001}, \
\"lora-merge@lr2e-3\": {\"lr\": 0.002}, \"lora-merge@lr5e-3\": {\"lr\": 0.005}, \"masked-lora@lr1e-2\": {\"lr\": 0.01}, \
\"masked-lora@lr2e-2\": {\"lr\": 0.02}, \"lora-merge@lr1e-2\": {\"lr\": 0.01}, \"lora-merge@lr2e-2\": {\"lr\": 0.02}"
BENCH_STEPS=40 BENCH_PATTERNS=0.7 BENCH_SEEDS=0 BENCH_DENSE_REF=0 BENCH_TASKS= BENCH_PPL_WINDOWS=16 \
BENCH_METHODS=static,masked-lora@lr5e-4,masked-lora@lr1e-3,masked-lora@lr2e-3,masked-lora@lr5e-3,lora-merge@lr5e-4,lora-merge@lr1e-3,\
lora-merge@lr2e-3,lora-merge@lr5e-3,masked-lora@lr1e-2,masked-lora@lr2e-2,lora-merge@lr1e-2,lora-merge@lr2e-2 \
BENCH_PPL_SOURCES=shakespeare:valid,commonsense:valid BENCH_JOBS=2 BENCH_DAMAGE_WINDOWS=2 BENCH_NAME=repair-val40-lora \
BENCH_DIR=runs/val40 BENCH_RESULTS_DIR=results BENCH_SETTINGS="{\"static\": {\"lr\": 0.001}, $LORA}" \
.venv/bin/python bench/bench_repair.py
# LoRA baselines' learning rate at the curve's larger ranks (session 17): masked LoRA at r 16 and r 64, lr 5e-3 and
# 1e-2 (the two best at r 8 above), same texts and budget; results/repair-val40-lora-rank.md. The 70% model is
# bench-repair-140's (same calibration) when that benchmark ran first.
[ -e runs/val40/pruned-0.7 ] || { [ -d runs/bench-repair-140/pruned-0.7 ] && mkdir -p runs/val40 && ln -s ../bench-repair-140/pruned-0.7 runs/val40/pruned-0.7; } || true
RANK="\"masked-lora@r16lr5e-3\": {\"lora_r\": 16, \"lr\": 0.005}, \"masked-lora@r16lr1e-2\": {\"lora_r\": 16, \"lr\": 0.01}, \
\"masked-lora@r64lr5e-3\": {\"lora_r\": 64, \"lr\": 0.005}, \"masked-lora@r64lr1e-2\": {\"lora_r\": 64, \"lr\": 0.01}"
BENCH_STEPS=40 BENCH_PATTERNS=0.7 BENCH_SEEDS=0 BENCH_DENSE_REF=0 BENCH_TASKS= BENCH_PPL_WINDOWS=16 \
BENCH_METHODS=masked-lora@r16lr5e-3,masked-lora@r16lr1e-2,masked-lora@r64lr5e-3,masked-lora@r64lr1e-2 \
BENCH_PPL_SOURCES=shakespeare:valid,commonsense:valid BENCH_JOBS=2 BENCH_DAMAGE_WINDOWS=2 BENCH_NAME=repair-val40-lora-rank \
BENCH_DIR=runs/val40 BENCH_RESULTS_DIR=results BENCH_SETTINGS="{$RANK}" \
.venv/bin/python bench/bench_repair.py
