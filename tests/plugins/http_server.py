"""pytest plugin: http_server fixtures (see tests/conftest.py)."""
