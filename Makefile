# Set-up and entry points. `make demo` and `make test` are the README's two commands:
# each installs what it needs (Debian packages, a venv with the package) first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup native bytecode demo test bench proto clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*) criu_py/native/build.py
	@command -v gcc >/dev/null && test -x /usr/bin/crit && python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq gcc make criu python3-venv python3-dev >/dev/null; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

native:
	flock build.lock $(PY) criu_py/native/build.py

# Every command imports the package: compiled once here, it is not compiled again by each
# command where PYTHONDONTWRITEBYTECODE keeps Python from caching what it compiles (a
# restore started 60-70 ms later without it). Cheap when nothing changed.
bytecode: setup
	@$(PY) -m compileall -q criu_py >/dev/null

proto:
	tools/gen_proto.sh

demo: bytecode
	$(VENV)/bin/python tools/demo.py

test: bytecode
	$(VENV)/bin/python -m pytest -q tests

bench: bytecode
	$(VENV)/bin/python bench/dump_restore.py

clean:
	rm -rf build $(VENV) criu_py/_native*.so
