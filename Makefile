# pladis: the two commands a newcomer needs are `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On a machine without an NVIDIA driver, pin the local CPU build of torch first, so that pip does not
# pull a multi-GB CUDA build; on a GPU machine pip's default (CUDA) torch is what the engines need.
TORCH_PIN := $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
# ONNX Runtime: exactly one of onnxruntime (extra "cpu") and onnxruntime-gpu (extra "gpu").
EXTRAS ?= $(if $(TORCH_PIN),cpu,gpu),dev
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/pladis demo --out out/demo
	@echo "wrote out/demo/report.md and out/demo/comparison.png"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
