# Ambit: `make demo` runs the sandbox demo, `make test` installs what it needs and runs every tier.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PKGS := ztunnel waypoint netsetup config
# command -> Debian package providing it
DEBS := ip:iproute2 nft:nftables iperf3:iperf3 curl:curl nc:netcat-openbsd tcpdump:tcpdump \
        stunnel4:stunnel4 nghttpx:nghttp2-proxy tinyproxy:tinyproxy haproxy:haproxy node:nodejs \
        systemd-analyze:systemd dot:graphviz setpriv:util-linux

.PHONY: demo test lint typecheck unit deps venv bench docs clean

demo: deps venv
	$(PY) -m config demo

test: deps venv lint typecheck
	$(PY) -m pytest -ra --durations=15 tests

unit: venv
	$(PY) -m pytest -q tests/unit tests/inproc

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy --strict $(PKGS)

deps:
	@missing=""; for pair in $(DEBS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root to install them)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bench: deps venv
	$(PY) -m bench
	$(PY) -m bench.mesh
	$(PY) -m bench.control_plane
	$(PY) -m bench.waypoint

docs:
	docs/render.sh

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
