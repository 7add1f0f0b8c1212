# Everything a fresh machine needs: `make rebuild` and `make test` create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/ptrace-0.9.9-debugger.toml
OUT    ?=
ARGS   ?=

.PHONY: venv rebuild test verify gate bench clean

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

rebuild: $(STAMP)
	$(BIN)/provenance build $(RECIPE) $(if $(OUT),--out $(OUT)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/train_vs_trainer.py

clean:
	rm -rf build .pytest_cache
