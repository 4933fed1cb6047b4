# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install everything, torch first.
# `make test` lints first (`make lint`), then runs every test; CI runs it (.ci/run).
# `make test-fast` lints, then runs the tests not marked `slow` (no Ray, cluster, browser or
# docker): every module, in minutes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdfleet-installed
# torch goes in first and pinned: a looser requirement lets pip resolve a multi-GB CUDA build
# on machines where only the CPU wheel is wanted (and the CUDA one is what PyPI serves on GPU boxes).
TORCH  ?= torch==2.13.0

.PHONY: install demo lint test test-fast clean-venv gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,nsfw]'
	# nsfw-detector's own requirements (tensorflow-hub==0.7.0) break on current TensorFlow;
	# its working set comes from the nsfw extra above, so it goes in without its deps.
	$(PY) -m pip install -q --no-deps "nsfw-detector==1.1.1"
	touch $@

demo: install
	$(VENV)/bin/sdfleet demo

# ruff's lint rules and formatter, and the import contracts (schemas <- actors <- jobs, schemas
# free of heavy frameworks); all configured in pyproject.toml. lint-imports reads the installed
# package, so it runs from the repo root.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

# PYTEST_ARGS passes more to pytest, e.g. `make test-fast PYTEST_ARGS="-x --durations=20"`.
test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# What bench/gpu_session.sh installs on the GPU machine (torch and transformers, Python 3.12, no
# diffusers, no importlib_metadata): the diffusers this venv runs, as pure-Python wheels in .whl/,
# which the device run carries.
gpu-wheels: install
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
	  "diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata

clean-venv:
	rm -rf $(VENV)
