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

# K-FAC vs SGD vs Adam on a small classifier (seconds), then ACKTR on Breakout through
# the CLI with a budget of a few minutes on 2 cores; the CLI prints where the learning
# curve and the model are.
DEMO_TIMESTEPS ?= 150000
demo: $(STAMP)
	$(PY) scripts/demo_kfac_vs_sgd.py
	$(PY) -m ngrl.train acktr --env Breakout --timesteps $(DEMO_TIMESTEPS) --eval-episodes 5

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not benchmark" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) scripts/bench_optimizer.py
	$(PY) scripts/bench_envs.py
	$(PY) scripts/bench_bayes.py
	$(PY) scripts/compare_rl.py --suite classic --seeds 3 --out docs/compare_rl_classic_$$(git rev-parse --short HEAD)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check ngrl agents bayes envs tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
