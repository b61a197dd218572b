"""The API's one typed configuration; the CLI builds it from the environment (the edge reads flags and env)."""

from __future__ import annotations

import hmac
import json

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from common.errors import ConfigurationError


class ApiSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: dict[str, SecretStr] = Field(description="client name -> bearer token; a client reads its own jobs")
    deployment: str = Field("render-manifest/adhoc", description="the deployment each job is a flow run of")
    jobs_prefix: str = Field(description="where uploads, their one-row manifests and their outputs go")
    allowed_prefixes: tuple[str, ...] = Field((), description="manifest and output URIs a job may name")
    upload_bytes: int = Field(32 * 2**20, ge=1, description="largest upload, portrait or audio")
    portrait_pixels: int = Field(40_000_000, ge=1)
    audio_seconds: float = Field(600.0, gt=0)
    requests_per_minute: int = Field(120, ge=1, description="per token")
    cors_origins: tuple[str, ...] = Field((), description="origins a browser may call the API from; none by default")

    def client_of(self, token: str) -> str | None:
        """The client whose token this is, compared in constant time against every token."""
        found = None
        for name, secret in self.tokens.items():
            if hmac.compare_digest(secret.get_secret_value().encode(), token.encode()):
                found = name
        return found


def parse_tokens(text: str) -> dict[str, SecretStr]:
    """``name=token,name=token`` or a JSON object (a Prefect Secret block's value)."""
    text = text.strip()
    try:
        pairs = json.loads(text) if text.startswith("{") else dict(p.split("=", 1) for p in text.split(",") if p)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigurationError("API tokens must be name=token pairs separated by commas, or a JSON object") from exc
    tokens = {str(k).strip(): SecretStr(str(v).strip()) for k, v in pairs.items()}
    if not tokens or any(len(v.get_secret_value()) < 16 or not k for k, v in tokens.items()):
        raise ConfigurationError("every API token needs a client name and at least 16 characters")
    return tokens
