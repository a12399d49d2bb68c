"""wscluster benchmark suite: ``python -m bench --help``."""
