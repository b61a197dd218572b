"""The job API's tokens and rate limit (pure: no server)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from api.app import RateLimit
from api.jobs import NotAllowed, allowed
from api.settings import ApiSettings, parse_tokens
from common.errors import ConfigurationError


def test_tokens_name_their_client_and_nothing_else():
    settings = ApiSettings(tokens=parse_tokens("studio-a=aaaaaaaaaaaaaaaa1,studio-b=bbbbbbbbbbbbbbbb2"),
                           jobs_prefix="/srv/jobs")
    assert settings.client_of("aaaaaaaaaaaaaaaa1") == "studio-a"
    assert settings.client_of("bbbbbbbbbbbbbbbb2") == "studio-b"
    assert settings.client_of("aaaaaaaaaaaaaaaa") is None and settings.client_of("") is None
    assert "aaaaaaaaaaaaaaaa1" not in repr(settings)  # secrets never print
    assert parse_tokens('{"studio-c": "cccccccccccccccc3"}')["studio-c"].get_secret_value() == "cccccccccccccccc3"
    with pytest.raises(ConfigurationError, match="16 characters"):
        parse_tokens("studio-a=short")


def test_uris_must_lie_under_an_allowed_prefix():
    prefixes = ("/srv/jobs", "s3://studio/catalog")
    assert allowed("/srv/jobs/a/m.parquet", prefixes) == "/srv/jobs/a/m.parquet"
    assert allowed("s3://studio/catalog/2026/m.parquet", prefixes) == "s3://studio/catalog/2026/m.parquet"
    for outside in ("/srv/jobsX/m.parquet", "/srv/jobs/../etc/passwd", "s3://studio/catalogue/m.parquet",
                    "s3://other/catalog/m.parquet", "/etc/passwd"):
        with pytest.raises(NotAllowed):
            allowed(outside, prefixes)


def test_the_rate_limit_counts_per_client():
    limit = RateLimit(per_minute=3)
    for _ in range(3):
        limit.check("studio-a")
    with pytest.raises(HTTPException) as refused:
        limit.check("studio-a")
    assert refused.value.status_code == 429
    limit.check("studio-b")  # another client's budget is its own
