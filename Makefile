.PHONY: setup demo test bench docs-config
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/cohort_scan.py
docs-config:
	.venv/bin/python -c "from clinfuse.config import config_reference; print(config_reference())" > docs/configuration.md
