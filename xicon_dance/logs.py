"""Logging: the job id on every line, secrets never printed. OWNER: core-run helper.

Contract:
- ``setup_logging(level)``; ``job_context(job_id)`` context manager that tags every record;
  ``redact(text) -> str`` removes bucket keys, API keys and presigned query strings.
"""
