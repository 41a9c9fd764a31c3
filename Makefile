# The commands the README names. Each target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local CPU wheel (any other torch spec pulls GBs of CUDA packages).
# GPU machines: make TORCH_SPEC=torch EXTRAS=gpu,dev ...
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

MODEL ?= btan2/cappy-large
OUT ?= exports/cappy-large

.PHONY: install test lint export verify clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

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
