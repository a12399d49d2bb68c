"""Example applications (``wscluster up --app examples.<name>.app:app`` from the repo root)."""
