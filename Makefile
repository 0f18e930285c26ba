# vmworker: `make run` starts the worker, `make test` runs the whole suite.
# Both first install what a fresh Debian machine lacks (QEMU, binutils for the
# test guests, a .venv from requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# command:package pairs checked before anything runs
SYSTEM_DEPS := qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils as:binutils

.PHONY: run test deps venv clean

run: deps venv
	$(PY) worker.py $(ARGS)

test: deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

deps:
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
