"""The `prefixd` commands, one module per group; `orchestrator/cli.py` holds the table of verbs."""
