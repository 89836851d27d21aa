"""Analyses: studies that explain how unlearning methods behave (`unlearnkit analyze ...`), as opposed to running or
scoring an unlearning job. Each analysis is a module here with its own subcommand (analysis/cli.py)."""
