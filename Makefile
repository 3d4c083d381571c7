# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The exact versions the developers and CI run; pyproject.toml declares the ranges users may hold.
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test install clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,baselines,hf]"
	touch $(STAMP)

install: $(STAMP)

# Passive OpenMP waits: the DDP tests run several torch processes on few cores.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m caap_lightning.demo

clean:
	rm -rf $(VENV) runs
