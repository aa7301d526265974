"""Click commands, one module per command (installed as ``wsiuda.cli``)."""
