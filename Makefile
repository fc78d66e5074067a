# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing; `make venv` only creates or updates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch is installed first so that a CUDA build of your choice is kept, e.g.
#   make venv TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch torchvision
EXTRAS ?= dev,dicom,ocr,export
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench docs clean help

help:
	@echo "make demo   - synthetic CT -> prep -> DeepSpeed ZeRO-2 training on 2 ranks -> eval ($(DEMO_OUT)/)"
	@echo "make test   - all tests (unit + multi-process DeepSpeed integration)"
	@echo "make bench  - every benchmark in bench/ (last line of each is JSON)"
	@echo "make docs   - the documentation site from docs/ (site/)"
	@echo "make venv   - create or update $(VENV) only"

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv:
	rm -f $(VENV)/.installed
	$(MAKE) $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/medscale demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

# The comparisons need their rivals: MONAI comes with the bench extra (never a runtime dependency).
bench: $(VENV)/.installed
	$(BIN)/python -c "import monai" 2>/dev/null || $(BIN)/pip install -q -e ".[$(EXTRAS),bench]"
	@set -e; for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info site
