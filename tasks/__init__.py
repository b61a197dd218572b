"""Prefect tasks: thin wrappers (caching, retries, logging) over the plain stage functions."""
