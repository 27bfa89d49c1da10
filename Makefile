# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test deps check venv clean bench bench-instructions bench-pushes bench-pay soak scale

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests need (redis-server, promtool, libfaketime...):
# installed with apt-get when missing, or named in one line before anything runs.
deps:
	@tools/test-deps

demo:
	@tools/test-deps --demo
	@$(MAKE) --no-print-directory $(STAMP)
	$(PY) -m proxy demo

test: deps $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

check: $(STAMP)
	$(PY) -m proxy check --config config.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

bench: $(STAMP)
	$(PY) bench/run.py

# Instructions per proxied call under callgrind (~40 s): repeatable, for A/B of code changes.
bench-instructions: $(STAMP)
	$(PY) bench/instructions.py

# Pushes per second through the callbacks listener, plaintext and safe mode (~30 s).
bench-pushes: $(STAMP)
	$(PY) bench/pushes.py

# A WeChat Pay call's added CPU against a forwarded call, with one RSA-2048 signature as the floor, a control
# with the RSA work swapped for pure-C work of the same cost, and a sequential run (~90 s; wrk, nginx).
bench-pay: $(STAMP)
	$(PY) bench/pay.py

# The long soak (2 minutes of mixed calls with rotating tokens); `make test` runs a short one.
soak: $(STAMP)
	SOAK_SECONDS=120 $(PY) -m pytest -q -s tests/test_soak.py

# The fleet on one Redis (~2 min: 20 sidecars x 50 apps, rotations every 5 s),
# then a platform with 100,000 authorizers in Redis (~30 s). Figures: bench/README.md.
scale: $(STAMP)
	$(PY) bench/fleet.py
	$(PY) bench/scale.py
