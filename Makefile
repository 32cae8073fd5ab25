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

bench: $(STAMP)
	$(VPY) bench/run.py

# 10,000 connections from 200 clients against -c 100 -b 256; checks and prints its figures (~15 s).
stress: $(STAMP)
	$(VPY) bench/stress.py

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
