# Two commands do all the set-up: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREFIX ?= /usr/local

.PHONY: all test lint demo bench stress clean install

all: test

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check ucspi tests bench bin/ucspi-launcher

test: $(STAMP) lint
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) examples/demo.py

# BENCH_ARGS: see bench/run.py --help (--baseline=COMMIT adds that commit's server to the rounds).
bench: $(STAMP)
	$(VPY) bench/run.py $(BENCH_ARGS)

# 10,000 connections from 200 clients against -c 100 -b 256; checks and prints its figures (~15 s).
# Then the isolation cases at full size: tcprules past 4 GiB and sharing TMP, the rules file
# replaced by devices and FIFOs, lookups short of descriptors, 1,000 TERMs during the start.
stress: $(STAMP)
	$(VPY) bench/stress.py
	for script in bench/stress_*.py; do $(VPY) $$script || exit 1; done

# tcprules against the C original on 100,000 generated files, then 1,000,000 through our own
# compiler alone; prints the figures, exits 1 on any difference. FUZZ_ARGS: see --help.
.PHONY: fuzz
fuzz: $(STAMP)
	$(VPY) tests/fuzz/tcprules_fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# A virtualenv under PREFIX/lib/ucspi (Debian refuses system-wide pip installs), commands linked
# into PREFIX/bin beside the original's other tools (tcpclient, rblsmtpd, recordio).
install:
	$(PYTHON) -m venv $(PREFIX)/lib/ucspi
	$(PREFIX)/lib/ucspi/bin/python -m pip install --quiet --disable-pip-version-check .
	mkdir -p $(PREFIX)/bin
	for command in tcpserver tcprules tcprulescheck; do \
	    ln -sf $(PREFIX)/lib/ucspi/bin/$$command $(PREFIX)/bin/$$command; \
	done
