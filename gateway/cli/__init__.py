"""The command line's commands, one module per family; ``gateway/__main__.py`` wires them
into the parser (``aai-gateway --help``)."""
