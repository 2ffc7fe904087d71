"""The `attnsparse` command line: one module per command over the Python API, registered in `app`."""
