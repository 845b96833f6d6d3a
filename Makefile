# Set-up and entry points. `make demo` and `make test` are the README's two commands:
# each installs what it needs (Debian packages, a venv with the package) first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup native demo test bench proto clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*) criu_py/native/build.py
	@command -v gcc >/dev/null && test -x /usr/bin/crit && python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq gcc make criu python3-venv python3-dev >/dev/null; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

native:
	flock build.lock $(PY) criu_py/native/build.py

proto:
	tools/gen_proto.sh

demo: setup
	$(VENV)/bin/python tools/demo.py

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: setup
	$(VENV)/bin/python bench/dump_restore.py

clean:
	rm -rf build $(VENV) criu_py/_native*.so
