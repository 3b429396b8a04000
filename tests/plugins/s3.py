"""pytest plugin: s3 fixtures (see tests/conftest.py)."""
