# The two commands of the README: `make run` (default workflow) and `make test` (test suite).
# Both create .venv on first use; torch is pinned and installed first, because an unpinned
# torch (pulled in by peft/accelerate/diffusers when absent) fetches a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2

.PHONY: run test ci-workflow ci-slurm setup setup-slurm clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Snakemake's Slurm executor plugin (pinned in pyproject's `slurm` extra), for profiles/slurm.
setup-slurm: $(VENV)/.installed-slurm

$(VENV)/.installed-slurm: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,slurm]'
	touch $@

# A reward worker's environment envs/.<name> from envs/<name>.yaml (hpsv2, imagereward, hpsv3): a venv with the
# yaml's python and pip pins, 5-6 GB each (PyPI's torch is the CUDA build); docs/reward-envs.md.
reward-env-%: setup
	$(BIN)/python scripts/build_reward_env.py $*

run: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest

ci-workflow: setup
	$(BIN)/snakemake --cores $(CORES) --configfile configs/ci.yaml

# configs/ci.yaml on a single-node Slurm started on this machine (root, Debian), compared with the local run; see
# .ci/slurm.sh.
ci-slurm: setup-slurm ci-workflow
	.ci/slurm.sh

clean:
	rm -rf results logs .snakemake
