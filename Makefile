# The two commands of the README: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint protos clean

$(BIN)/ctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (it lies on disk here), then the project with its extras.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[model,triton,dev]'
	$(BIN)/python -m pip check
	touch $@

demo: $(BIN)/ctl
	$(BIN)/ctl demo

test: $(BIN)/ctl
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(BIN)/ctl
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: $(BIN)/ctl
	$(BIN)/python -m ctl.codegen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
