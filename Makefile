# Two commands for a new machine: `make demo` and `make test`.
# Torch is installed first and pinned, because any other version is a multi-gigabyte
# download here; override with `make test TORCH="torch==X.Y.Z"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo_kfac_vs_sgd.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not benchmark" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_optimizer.py
	$(PY) scripts/bench_envs.py

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check ngrl agents bayes envs tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
