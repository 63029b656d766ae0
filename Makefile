# Two commands on a fresh machine: `make demo` (set-up + a CPU training run) and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: demo test env data docs

demo: env data
	bash launch/demo.sh

test: env
	$(VENV)/bin/python -m pytest -q

env: $(VENV)/.installed

# NOTE: torch and torchvision first and pinned: they install from the local disk here, and a
# later resolver run must not pull a different build (torch 2.13 + torchvision fails to import).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[test,wandb,deepspeed]'
	touch $@

data: data/demo/dataset.json

data/demo/dataset.json:
	bash launch/fetch_demo_data.sh
	$(VENV)/bin/lvmtrain data demo data/demo

docs: env
	$(VENV)/bin/lvmtrain config docs --write README.md
