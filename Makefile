# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision releases to install; override for another platform, e.g. TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install -q $(TORCH) >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install -q -e '.[dev]' >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@touch $@

demo: $(STAMP)
	@$(BIN)/res2net models --time

test: $(STAMP)
	@$(BIN)/python -m pytest

test-slow: $(STAMP)
	@$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
