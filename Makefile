# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision releases to install; override for another platform, e.g. TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-dev

.PHONY: demo lint test test-slow soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install -q $(TORCH) >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install -q -e '.[dev]' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@touch $@

demo: $(STAMP)
	@$(BIN)/res2net demo

# Lint and type-check src/ and benchmarks/, and check the import layers (settings in pyproject.toml);
# `make test` stops here on the first finding.
lint: $(STAMP)
	@$(BIN)/ruff check src benchmarks tests hubconf.py train.py validate.py
	@$(BIN)/ruff format --check --quiet src benchmarks tests hubconf.py train.py validate.py
	@$(BIN)/mypy
	@$(BIN)/lint-imports --no-cache

test: lint
	@$(BIN)/python -m pytest

test-slow: $(STAMP)
	@$(BIN)/python -m pytest -m slow

# The long reliability runs: kill/stop/fault tests at every point, 10,000+ fuzz cases, then the
# memory/open-files soak; writes docs/soak.json, docs/soak.png and the figures in docs/reliability.md.
soak: $(STAMP)
	@rm -f $(VENV)/soak-figures.json
	@{ RELIABILITY_FIGURES=$(VENV)/soak-figures.json $(BIN)/python -m pytest -m slow --hypothesis-show-statistics \
		tests/test_reliability.py tests/test_mindspore_ckpt.py; echo $$? > $(VENV)/soak-tests.status; } 2>&1 \
		| tee $(VENV)/soak-tests.log
	@exit $$(cat $(VENV)/soak-tests.status)
	@$(BIN)/python -m tests.soak --figures $(VENV)/soak-figures.json --tests-log $(VENV)/soak-tests.log

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
