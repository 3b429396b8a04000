"""pytest plugin: media_factory fixtures (see tests/conftest.py)."""
