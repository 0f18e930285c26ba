# vmworker: `make run` starts the worker, `make test` runs the whole suite.
# Both first install what a fresh Debian machine lacks (QEMU, binutils for the
# test guests, a .venv from requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# path:package pairs checked before anything runs (a bare name is looked up
# on PATH). The worker needs QEMU and noVNC (the web console, served as
# /static/novnc/); the tests also need binutils (to assemble the boot-sector
# guests) and Chromium (the browser tests). Recommends stay out: with them,
# udev and upower fail to configure on these machines and apt exits 100.
RUN_DEPS := qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils \
	/usr/share/novnc/core/rfb.js:novnc
TEST_DEPS := $(RUN_DEPS) as:binutils /usr/bin/chromium:chromium

.PHONY: run test deps venv clean

run: DEPS = $(RUN_DEPS)
run: deps venv
	$(PY) worker.py $(ARGS)

test: DEPS = $(TEST_DEPS)
test: deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

DEPS ?= $(TEST_DEPS)
deps:
	@missing=""; \
	for pair in $(DEPS); do \
		want=$${pair%%:*}; \
		case $$want in \
		/*) [ -e $$want ] || missing="$$missing $${pair#*:}" ;; \
		*) command -v $$want >/dev/null 2>&1 || missing="$$missing $${pair#*:}" ;; \
		esac; \
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

# Benchmarks (issue 7): `make bench` writes BENCHMARKS.md (about 5-10 min),
# `make bench-quick` is the one-minute version. wrk is used when it can be
# installed, else a Python load generator. BENCH_ARGS passes options through
# (e.g. BENCH_ARGS="--rows start,journal" or "--output /tmp/b.md").
BENCH_ARGS ?=

.PHONY: bench bench-quick

bench: deps venv
	@command -v wrk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 || echo "wrk not installable: the status row uses the Python load generator"
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: deps venv
	@command -v wrk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 || echo "wrk not installable: the status row uses the Python load generator"
	$(PY) bench/run.py --quick $(BENCH_ARGS)
