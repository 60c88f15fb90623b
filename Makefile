# Builds libkvmsmoke.so next to boxlite_syscheck.py, which loads it by
# absolute path.  `make test` sets up .venv and runs the tests.
CC ?= cc
CFLAGS ?= -O2 -g
CFLAGS += -std=gnu11 -Wall -Wextra -Werror -fPIC -fvisibility=default
LDFLAGS += -shared -Wl,-z,now -Wl,-z,relro
PYTHON ?= python3
VENV := .venv

.PHONY: all test lint bench bench-load stress clean test-x86-nested test-aarch64

all: libkvmsmoke.so __pycache__/.bytecode

# Cached bytecode, so that `python3 -m boxlite_syscheck` starts without
# compiling the module (it is read even where PYTHONDONTWRITEBYTECODE is
# set): faster, and it fits where compiling would not (a small RLIMIT_AS).
__pycache__/.bytecode: boxlite_syscheck.py
	$(PYTHON) -m py_compile boxlite_syscheck.py
	touch $@

libkvmsmoke.so: kvm_smoke.c
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $<

# The test dependencies only (pyproject.toml's "test" extra): the tests use
# the module in this directory, and test_packaging.py builds and installs
# the package itself.
$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "pytest>=7" "pytest-mock>=3.10" "prometheus_client>=0.17" "jsonschema>=4.18" build
	touch $@

test: all $(VENV)/.ready
	$(VENV)/bin/python -m pytest -ra

lint: $(VENV)/.ready
	$(VENV)/bin/pip install --quiet ruff mypy
	$(VENV)/bin/ruff check boxlite_syscheck.py setup.py tests
	$(VENV)/bin/ruff format --check boxlite_syscheck.py setup.py tests
	$(VENV)/bin/mypy --strict boxlite_syscheck.py

clean:
	rm -rf libkvmsmoke.so $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache __pycache__ tests/__pycache__

# The positive control: a KVM that really runs guest code (QEMU's emulator
# with an emulated AMD SVM CPU), where the default gate must pass.
test-x86-nested: libkvmsmoke.so
	$(PYTHON) tests/vmhost.py x86-nested

# The arm64 smoke test on an emulated arm64 host with EL2 (and one without).
test-aarch64:
	$(PYTHON) tests/vmhost.py aarch64

# ARGS=--load (or make bench-load) repeats the table with a busy loop on
# every CPU and compares each ratio with its quiet value.
bench: all
	$(PYTHON) tests/bench.py $(ARGS)

bench-load: all
	$(PYTHON) tests/bench.py --load

stress: libkvmsmoke.so
	$(PYTHON) tests/bench.py --stress
