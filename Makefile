# Two commands for a new machine: `make demo` and `make test`.
# Torch is installed first and pinned, because any other version is a multi-gigabyte
# download here; override with `make test TORCH="torch==X.Y.Z"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench peers calibration lint clean

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

# One worker per core; `--dist loadfile` keeps a file's tests (and the processes its
# module fixtures start) on one worker.
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow and not gpu and not benchmark"

test-all: $(STAMP)
	$(PYTEST)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) scripts/bench_optimizer.py
	$(PY) scripts/bench_envs.py
	$(PY) scripts/bench_bayes.py
	$(PY) scripts/compare_rl.py --suite classic --seeds 3 --out docs/compare_rl_classic_$$(git rev-parse --short HEAD)

# The calibration peers (IVON, laplace-torch) with torch held at the installed version.
# laplace-torch never imports torchvision, but torchmetrics does when it is installed, and
# a PyPI torchvision built for CUDA cannot load its operators with a CPU-only torch: it is
# removed when it fails to import.
peers: $(STAMP)
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-constraint.txt -e ".[peers]"
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall --quiet -y torchvision
	$(PY) -c "import ivon, laplace; print('peers ready: ivon-opt, laplace-torch')"

# The calibration tables of docs/benchmarks.md.
CALIBRATION_METHODS ?= adam,vogn,noisy-kfac,noisy-ekfac,slang,noisy-adam,ivon,laplace,ensemble
calibration: peers
	for d in digits breast_cancer mnist1d; do \
		$(PY) scripts/evaluate_calibration.py --dataset $$d --methods $(CALIBRATION_METHODS) \
			--seeds 5 --out results/calibration/$$d || exit 1; \
	done

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check ngrl agents bayes envs tests scripts
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
