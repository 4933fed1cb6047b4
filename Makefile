# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install everything, torch first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdfleet-installed
# torch goes in first and pinned: a looser requirement lets pip resolve a multi-GB CUDA build
# on machines where only the CPU wheel is wanted (and the CUDA one is what PyPI serves on GPU boxes).
TORCH  ?= torch==2.13.0

.PHONY: install demo test clean-venv

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

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
