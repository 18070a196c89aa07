.PHONY: setup demo test bench docs-config
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/run_all.py
docs-config:
	.venv/bin/python -c "from clinfuse.config import config_reference; print(config_reference())" > docs/configuration.md
	(echo "# clinfuse default configuration: every key with its default value (generated from clinfuse/config.py)."; echo "# Copy it, change what you need, pass it with --config. Unknown keys are rejected. Reference: docs/configuration.md"; .venv/bin/python -c "from clinfuse.config import Config, dump_config; print(dump_config(Config()), end='')") > configs/default.yaml
