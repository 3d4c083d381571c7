# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,baselines]"
	touch $(STAMP)

install: $(STAMP)

# Passive OpenMP waits: the DDP tests run several torch processes on few cores.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m caap_lightning.demo

clean:
	rm -rf $(VENV) runs
