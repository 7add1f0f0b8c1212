# Everything a fresh machine needs: `make rebuild` and `make test` create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/ptrace-0.9.9-debugger.toml
NAME   := $(basename $(notdir $(RECIPE)))
OUT    ?= build/$(NAME)
ARGS   ?=
GATEARGS ?=
REF    := attestations/$(NAME).intoto.jsonl
REFKEY := attestations/keys/$(NAME).pub
REFAUDIT := attestations/$(NAME).audit.intoto.jsonl
REFOMS := attestations/$(NAME).model.sig
REFLOG := attestations/$(NAME).transcript.jsonl
# The reference signing key lives outside the repository and is never committed.
REFERENCE_KEY ?= $(HOME)/.config/provenance/reference/$(NAME).key

.PHONY: venv rebuild rebuild-from-source test test-fast lint verify reference gate bench lock clean

# Every package from the hashed lock (pip refuses a file whose sha256 differs, and installs nothing
# else: --no-deps), then the project itself, built with the locked setuptools; `pip check` confirms
# the lock is complete. tools/lock.py writes the locks from constraints.txt (`make lock`).
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
$(STAMP): locks/dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes --no-deps -r locks/dev.lock
	$(PIP) --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

# Build, then ask whether it reproduces the committed reference attestation (last line: the verdict,
# "reproduced (bitwise)" on the reference's stack). `make verify` asks the exact question.
rebuild: $(STAMP)
	$(BIN)/provenance build $(RECIPE) --out $(OUT) $(ARGS)
	@if [ -f $(REF) ]; then \
	  $(BIN)/verify-attestation $(REF) --key $(REFKEY) --model $(OUT)/model --recipe $(RECIPE) --reproduced --inputs \
	    --audit $(REFAUDIT); \
	else echo "verdict: no reference attestation for $(NAME) in attestations/"; fi

# The corresponding source proved complete (docs/reproducibility.md, "Rebuilding from the corresponding
# source"): build the recipe (it writes source.tar beside the model), then rebuild from that archive alone,
# offline, from an empty store, with the archive's own code and, where `unshare` allows, no network at all;
# then judge the result against the committed reference too.
SRCOUT  := build/$(NAME)-from-source
SIGNKEY ?= $(or $(PROVENANCE_KEY),$(HOME)/.config/provenance/keys/provenance.key)
NONET   := $(shell unshare -rn true 2>/dev/null && echo unshare -rn)
rebuild-from-source: $(STAMP)
	$(BIN)/provenance build $(RECIPE) --out $(OUT) $(ARGS)
	rm -rf $(SRCOUT) $(SRCOUT).no-store
	PROVENANCE_STORE=$(CURDIR)/$(SRCOUT).no-store $(NONET) $(BIN)/provenance rebuild $(OUT)/attestation.intoto.jsonl \
	  --attestation-key $(basename $(SIGNKEY)).pub --from-source $(OUT)/source.tar --out $(SRCOUT)
	@if [ -f $(REF) ]; then \
	  $(BIN)/verify-attestation $(REF) --key $(REFKEY) --model $(SRCOUT)/model --reproduced; fi

# Verify the committed reference attestation against the last build: exactly these files, byte for byte.
verify: $(STAMP)
	$(BIN)/verify-attestation $(REF) --key $(REFKEY) --model $(OUT)/model --recipe $(RECIPE) --inputs --audit $(REFAUDIT)
	if [ -f $(REFOMS) ]; then $(BIN)/verify-attestation $(REFOMS) --key $(REFKEY) --model $(OUT)/model; fi

# Regenerate the reference attestation (after a change that alters the default recipe's weights).
reference: $(STAMP)
	@if [ ! -f $(REFERENCE_KEY) ]; then \
	  rm -f $(REFKEY); $(BIN)/provenance keygen $(dir $(REFERENCE_KEY)) --name $(NAME); fi
	$(BIN)/provenance build $(RECIPE) --out $(OUT) --key $(REFERENCE_KEY) $(ARGS)
	cp $(basename $(REFERENCE_KEY)).pub $(REFKEY)
	cp $(OUT)/attestation.intoto.jsonl $(REF)
	cp $(OUT)/audit.intoto.jsonl $(REFAUDIT)
	if [ -f $(OUT)/model.sig ]; then cp $(OUT)/model.sig $(REFOMS); fi
	@# a portable recipe's rebuilds follow the reference's signed rounding log (docs/reproducibility.md)
	if grep -q '^portable *= *true' $(RECIPE); then cp $(OUT)/transcript.jsonl $(REFLOG); fi
	$(BIN)/verify-attestation $(REF) --key $(REFKEY) --model $(OUT)/model --recipe $(RECIPE) --audit $(REFAUDIT)

# CI gate: rebuild and judge against the committed reference (bitwise on the same stack, else tolerance).
gate: $(STAMP)
	$(BIN)/provenance gate --recipe $(RECIPE) --junit build/gate-junit.xml $(GATEARGS)

# ruff with the rule set in pyproject.toml ([tool.ruff.lint], where the choice is explained), then mypy
# --strict on the verifier and what it stands on ([tool.mypy]: _internal, recipe, attest, verify).
lint: $(STAMP)
	$(BIN)/ruff check provenance tests bench
	$(BIN)/mypy

# The layering check first (a second or two, no imports of the package), then everything.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_layering.py
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --deselect tests/test_layering.py --durations=15

# The tests that build no model (under 2 minutes on the 2-core machines): the layering check, the
# verifier's adversarial cases that need no build, the kernels' known answers, recipe rules, formats.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_layering.py
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not builds" --deselect tests/test_layering.py

bench: $(STAMP)
	$(BIN)/python bench/train_vs_trainer.py
	$(BIN)/python bench/verify_vs_model_signing.py
	$(BIN)/python bench/fuzz.py
	$(BIN)/python bench/laam_first_steps.py
	$(BIN)/python bench/laam_rehearsal.py
	$(BIN)/python bench/portable.py
	$(BIN)/python bench/topology.py

clean:
	rm -rf build .pytest_cache

# Regenerate the hashed locks (locks/*.lock) after a change to constraints.txt or pyproject.toml.
lock:
	$(PYTHON) tools/lock.py
