# Two commands do all the set-up: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREFIX ?= /usr/local
DEST := $(abspath $(PREFIX))
# The commands (ucspi/cli's COMMANDS) and their man pages.
COMMANDS := $(shell sed -n 's/^COMMANDS = (\(.*\))$$/\1/p' ucspi/cli/__init__.py | tr -d '",')
PAGES := $(wildcard man/*.1)
# pip's cache: $HOME's when it can be written, else one inside the virtualenv (an unprivileged
# user such as nobody may have no home at all).
PIP_CACHE := $(shell if [ -w "$${HOME:-/nonexistent}" ]; then echo "$$HOME/.cache/pip"; else echo "$(CURDIR)/$(VENV)/.pip-cache"; fi)
PIP := --quiet --disable-pip-version-check --cache-dir=$(PIP_CACHE)

.PHONY: all test lint man demo bench stress clean install uninstall

all: test

$(STAMP): setup.cfg pyproject.toml setup.py ucspi/server/_spawn.c bin/tcpserver.c bin/tcpserver.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(PIP) -e '.[test]'
	$(call launcher,$(VENV)/bin)
	touch $@

# tcpserver's native launcher (bin/tcpserver.c), compiled into $(1)/tcpserver over the entry
# point ($(1)/sslserver made a link to it: softlimit -m lets sslserver start too) and, in a
# checkout, into bin/tcpserver. Where $(CC) fails (none installed, or CC=false
# to try the fallback: setuptools then leaves out the extension too), bin/tcpserver is the
# Python launcher bin/tcpserver.py and $(1)/tcpserver the entry point. Renamed into place: a
# server starting meanwhile finds the old file or the new one.
define launcher
	@echo "$(CC) -O2 -Wall -o $(1)/tcpserver bin/tcpserver.c"; \
	if $(CC) -O2 -Wall -o $(1)/.tcpserver.new bin/tcpserver.c; then \
	    mv -f $(1)/.tcpserver.new $(1)/tcpserver; \
	    ln -sfn tcpserver $(1)/.sslserver.new && mv -Tf $(1)/.sslserver.new $(1)/sslserver; \
	    if [ "$(1)" = "$(VENV)/bin" ]; then cp $(1)/tcpserver bin/.tcpserver.new && mv -f bin/.tcpserver.new bin/tcpserver; fi; \
	else \
	    echo "make: no C compiler ($(CC)): tcpserver starts through Python, and softlimit -m needs room for it" >&2; \
	    rm -f $(1)/.tcpserver.new; \
	    if [ -L $(1)/sslserver ]; then rm -f $(1)/sslserver; \
	        printf '#!%s\nimport sys\nfrom ucspi.cli.sslserver import main\nsys.exit(main())\n' $(1)/python > $(1)/sslserver; \
	        chmod 755 $(1)/sslserver; fi; \
	    if [ "$(1)" = "$(VENV)/bin" ]; then ln -sfn tcpserver.py bin/.tcpserver.new && mv -Tf bin/.tcpserver.new bin/tcpserver; fi; \
	fi
endef

lint: $(STAMP)
	$(VENV)/bin/ruff check ucspi tests bench man bin/ucspi-launcher bin/tcpserver.py

# -rs: every skipped test says why (the original not installed, not root, ...).
test: $(STAMP) lint
	$(VPY) -m pytest -q -rs

# tcpserver(1)'s OPTIONS section, from the option table (tests/install/test_man.py checks it).
man: $(STAMP)
	$(VPY) man/generate.py

demo: $(STAMP)
	$(VPY) examples/demo.py

# Start-up of tcprules and tcprulescheck against `python3 -I -c pass` and the C ones (~1 min),
# then BENCH_ARGS: see bench/run.py --help (--baseline=COMMIT adds that commit's server).
bench: $(STAMP)
	$(VPY) bench/startup.py
	$(VPY) bench/tcpclient_startup.py
	$(VPY) bench/run.py $(BENCH_ARGS)
	$(VPY) bench/proxy_bench.py
	$(VPY) bench/fairness.py
	$(VPY) bench/tls_bench.py

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

# The extension built in place and the native launcher too: `make clean; make test CC=false`
# must find neither, to test the fallback.
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache ucspi/server/_spawn*.so bin/tcpserver

# A virtualenv under PREFIX/lib/ucspi (Debian refuses system-wide pip installs), commands linked
# into PREFIX/bin beside the original's other tools (rblsmtpd, recordio), man pages into
# PREFIX/share/man/man1. A command of the same name that is not ours (Debian's /usr/bin/tcpserver)
# is left alone unless FORCE=1. PYTHON=/usr/bin/python3 when yours is one only you can read.
install:
	@for command in $(COMMANDS); do \
	    link=$(DEST)/bin/$$command; \
	    if [ -e "$$link" ] || [ -L "$$link" ]; then \
	        case "$$(readlink -m "$$link")" in \
	            $(DEST)/lib/ucspi/*) ;; \
	            *) if [ "$(FORCE)" != 1 ]; then \
	                echo "make install: $$link exists and is not ours; FORCE=1 replaces it" >&2; exit 1; fi ;; \
	        esac; \
	    fi; \
	done
	$(PYTHON) -m venv $(DEST)/lib/ucspi
	$(DEST)/lib/ucspi/bin/python -m pip install $(PIP) .
	$(call launcher,$(DEST)/lib/ucspi/bin)
	mkdir -p $(DEST)/bin $(DEST)/share/man/man1
	for command in $(COMMANDS); do ln -sfn $(DEST)/lib/ucspi/bin/$$command $(DEST)/bin/$$command; done
	for page in $(PAGES); do cp $$page $(DEST)/share/man/man1/ && chmod 644 $(DEST)/share/man/man1/$${page#man/}; done
	printf '%s\n' $(notdir $(PAGES)) > $(DEST)/lib/ucspi/man-pages
	@# Every user must be able to run them (qmail runs tcprules as its admin user).
	@if [ "$$(id -u)" = 0 ] && command -v setpriv >/dev/null; then \
	    as_nobody="setpriv --reuid=65534 --regid=65534 --clear-groups"; \
	else as_nobody=""; fi; \
	for command in $(COMMANDS); do \
	    if ! $$as_nobody $(DEST)/bin/$$command --version >/dev/null 2>&1 \
	       || ! $(DEST)/lib/ucspi/bin/python -I -c "$$WORLD_READABLE" 2>/dev/null; then \
	        echo "make install: warning: $(DEST)/bin/$$command cannot be run by other users:" \
	             "the Python it was installed with ($$(readlink -f $(DEST)/lib/ucspi/bin/python))" \
	             "or the install is not readable by them. To use another one:" \
	             "make uninstall PREFIX=$(PREFIX); make install PREFIX=$(PREFIX) PYTHON=/usr/bin/python3" >&2; \
	        break; \
	    fi; \
	done

# What `make install` put there: the links into PREFIX/lib/ucspi, that directory, our man pages.
uninstall:
	for command in $(COMMANDS); do \
	    link=$(DEST)/bin/$$command; \
	    if [ -L "$$link" ]; then case "$$(readlink "$$link")" in $(DEST)/lib/ucspi/*) rm -f "$$link" ;; esac; fi; \
	done
	if [ -f $(DEST)/lib/ucspi/man-pages ]; then \
	    while read -r page; do rm -f "$(DEST)/share/man/man1/$$page"; done < $(DEST)/lib/ucspi/man-pages; \
	fi
	rm -rf $(DEST)/lib/ucspi

# For install's check: the interpreter, its standard library and the install itself must be
# readable (and their directories searchable) by others, all the way up from /.
define WORLD_READABLE
import os, sys, sysconfig
paths = [os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
for path in map(os.path.realpath, paths):
    mode = os.stat(path).st_mode
    assert mode & 0o004 and (not os.path.isdir(path) or mode & 0o001), path
    while path != "/":
        path = os.path.dirname(path)
        assert os.stat(path).st_mode & 0o001, path
endef
export WORLD_READABLE
