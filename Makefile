# The two commands of the README: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint protos clean triton-cpu browser

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BIN)/ctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (it lies on disk here), then the project with its extras.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[model,triton,dev]'
	$(BIN)/python -m pip check
	touch $@

demo: $(BIN)/ctl
	$(BIN)/ctl demo

# A real Triton server on this CPU for the tests and developers (tools/triton_cpu/): about 30 s and
# 1.2 GB the first time (PyPI's nvidia-pytriton wheel, a venv with torch and numpy<2), instant after.
triton-cpu: $(BIN)/ctl
	$(BIN)/python -m tools.triton_cpu setup

# Debian's Chromium for the tests that open the HTML reports (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

test: $(BIN)/ctl triton-cpu browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest

lint: $(BIN)/ctl
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/lint-imports --no-cache

protos: $(BIN)/ctl
	$(BIN)/python -m ctl.codegen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
