# expertmesh: `make demo` (the main job) and `make test`. Both create .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Local-only Ray settings (loopback, no usage stats, explicit auth mode); see expertmesh/envs.py.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-deps test-gpu lint format venv bench vllm-env ui-vendor

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m expertmesh.pipelines.demo

test: $(STAMP) test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

# What the tests need beyond Python: Debian's PostgreSQL, the MLflow server's database in
# tests/integration/test_k8s_path.py (the fixture runs its own instance on 127.0.0.1). Installed
# without Debian's system-wide `main` cluster, which nothing here uses. The manifest tests need
# kubectl (its built-in kustomize); Debian's kubernetes-client is too old, so it is not
# installed here and those tests say they were skipped.
test-deps:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null; then \
		:; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "PostgreSQL missing and not root: install Debian's postgresql, or its test skips"; \
	else \
		mkdir -p /etc/postgresql-common/createcluster.d && \
		echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/expertmesh.conf && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	fi
	@command -v kubectl >/dev/null || echo "kubectl missing: tests/unit/test_k8s.py will be skipped"
	@# the console's browser tests (tests/browser) drive Debian's Chromium through Playwright;
	@# never `playwright install`: that downloads browsers from the internet
	@if command -v chromium >/dev/null; then \
		:; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "Chromium missing and not root: install Debian's chromium, or tests/browser skip"; \
	else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi

# Refresh the console's vendored ES modules (ui/vendor) from the versions ui/package.json pins.
ui-vendor:
	bash ui/refresh-vendor.sh

# The GPU checks (tests/gpu: model, training step, checkpoints and engine on CUDA against the
# CPU and transformers), on a machine whose torch sees a CUDA GPU; `make test` collects none.
PYTHON_GPU ?= $(PY)
test-gpu:
	$(PYTHON_GPU) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU')"
	$(PYTHON_GPU) -m pytest -q tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# vLLM for CPUs in its own venv: the reference engine bench/serving.py compares against
vllm-env:
	bash bench/vllm_env.sh

bench: $(STAMP)
	$(PY) bench/moe_layer.py
	$(PY) bench/quality_moe_vs_dense.py
	$(PY) bench/placement_sim.py
	$(PY) bench/serving.py
	$(PY) bench/staggered_arrivals.py
	$(PY) bench/chaos.py
	$(PY) bench/ray_rpc.py
	$(PY) bench/train_throughput.py
	$(PY) bench/upgrade.py
	$(PY) bench/soak.py
