# pladis: the two commands a newcomer needs are `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On a machine without an NVIDIA driver, pin the local CPU build of torch first, so that pip does not
# pull a multi-GB CUDA build; on a GPU machine pip's default (CUDA) torch is what the engines need.
TORCH_PIN := $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
# ONNX Runtime: exactly one of onnxruntime (extra "cpu") and onnxruntime-gpu (extra "gpu").
EXTRAS ?= $(if $(TORCH_PIN),cpu,gpu),serve,ray,dev
STAMP  := $(VENV)/.installed
REPORT  = $(BIN)/python -m pladis.bench.report --results bench/results --doc docs/PERFORMANCE.md

.PHONY: setup test demo lint export engine gpu-check bench bench-export bench-lora bench-report soak clean
MODEL ?= tiny-sdxl
BACKEND ?= ort
PRECISION ?= fp32
ONNX_PRECISION = $(PRECISION)
ONNX_DIR = build/$(MODEL)-onnx-$(ONNX_PRECISION)

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
	@echo "wrote out/demo/report.md, comparison.png, parity.json, parity.png and the export out/demo/engine/"

# Export a pipeline to ONNX: make export MODEL=tiny-sdxl PRECISION=fp32 (extra flags: ARGS="--force"); with the
# defaults it writes pladis.options.DEFAULT_EXPORT (build/tiny-sdxl-onnx-fp32), what `pladis build` reads
export: setup
	$(BIN)/pladis export --model $(MODEL) --out $(ONNX_DIR) --precision $(ONNX_PRECISION) $(ARGS)

# Export (once: delete the folder to re-export) then build, cached:
#   make engine MODEL=tiny-sdxl BACKEND=ort|aoti|trt PRECISION=fp32|fp16|bf16
# Every backend runs the graph in the exported precision (TensorRT builds are strongly typed), so the export is
# made in PRECISION. With the defaults it
# writes pladis.options.DEFAULT_ENGINE (build/tiny-sdxl-ort-fp32), what generate, parity and serve read.
engine: setup
	test -f $(ONNX_DIR)/manifest.json || $(BIN)/pladis export --model $(MODEL) --out $(ONNX_DIR) \
		--precision $(ONNX_PRECISION) $(ARGS)
	$(BIN)/pladis build --onnx $(ONNX_DIR) --backend $(BACKEND) --precision $(PRECISION) \
		--out build/$(MODEL)-$(BACKEND)-$(PRECISION)

# GPU machine: the tests marked gpu (kernel vs operator, TensorRT builds) and the operator benchmark on the
# GPU; see .ci/gpu-check (runs without the venv on a lent GPU machine)
gpu-check:
	bash .ci/gpu-check

# The benchmark suite (CPU: about 5 minutes) and the report, docs/PERFORMANCE.md
bench: setup
	$(BIN)/python -m pladis.bench.suite --out bench/results
	$(REPORT)

# Export benchmarks (CPU: ~2 min for the denoiser case, ~15 min and ~10 GB RAM for full-size SDXL fp16)
bench-export: setup
	$(BIN)/python -m pladis.bench.export_bench --out bench/results
	$(REPORT)

# LoRA swap on a built engine vs re-export + build with it fused (full-size sd15, CPU: ~16 GB RAM, tens of minutes)
bench-lora: setup
	$(BIN)/python -m pladis.bench.lora_swap --out bench/results
	$(REPORT)

# A bounded soak of the server (2 minutes of mixed valid, invalid, cancelled and slow requests)
soak: setup
	$(BIN)/python -m pladis.bench.soak --minutes 2 --out bench/results
	$(REPORT)

bench-report: setup
	$(REPORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out build .pytest_cache .hypothesis
