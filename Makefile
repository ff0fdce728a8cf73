# Two entry points a fresh machine needs: `make quickstart` and `make test`.
# Both build .venv first (idempotent: a stamp file records a finished install).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# CPU-only machines pin the local CPU torch wheel; a machine with nvidia-smi takes torch as declared.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")

.PHONY: venv quickstart test clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install $(CONSTRAINTS) -e '.[test,deepspeed]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/gam-pretrain quickstart $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
