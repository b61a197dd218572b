"""The job API (FastAPI): submit a manifest or one uploaded line as a flow run of the render deployment, follow it,
fetch its videos. Every route but /v1/health needs a bearer token; a client sees only its own jobs.

Errors are one JSON line (``{"detail": …}``) naming what to change; no traceback or internal path is ever sent.
"""


import logging
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound as RunNotFound
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from common import storage
from common.errors import InputError, InputTooLarge
from manifests import ManifestError
from tasks.graph import BACKENDS

from . import jobs
from .settings import ApiSettings
from .uploads import BadUpload, read_parts, sniff_audio, sniff_portrait

Backend = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]


class ManifestJob(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "manifest_uri": "s3://studio/manifests/2026-12-01.parquet", "output_uri": "s3://studio/renders/2026-12-01",
        "backend": "preview"}]})

    manifest_uri: str = Field(min_length=1, max_length=2048)
    output_uri: str = Field(min_length=1, max_length=2048)
    backend: Backend | None = None


class JobCreated(BaseModel):
    job_id: UUID
    state: str
    ui_url: str | None = Field(None, description="the flow run in the Prefect UI")
    status_url: str


class Item(BaseModel):
    item_id: str
    status: str
    error_class: str | None = None
    error_message: str | None = None
    frame_count: int | None = None
    video_url: str | None = Field(None, description="GET it for the MP4 (a redirect for object stores)")


class JobStatus(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "job_id": "0f5b7c2e-8d3a-4c1e-9a4b-2f6d1e0c9b7a", "state": "Completed", "final": True, "progress": 100.0,
        "total": 1, "succeeded": 1, "failed": 0, "items": [{"item_id": "line", "status": "succeeded",
                                                           "frame_count": 81}]}]})

    job_id: UUID
    state: str
    final: bool
    progress: float | None = Field(None, description="percent of items done, while it runs")
    total: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    ui_url: str | None = None
    items: list[Item] = []


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (401, 403, 404, 413, 422, 429)}


class RateLimit:
    """At most ``per_minute`` requests per client in any 60 s (kept in the app, per process)."""

    def __init__(self, per_minute: int):
        self.per_minute, self.seen = per_minute, {}

    def check(self, client: str) -> None:
        now, window = time.monotonic(), self.seen.setdefault(client, deque())
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.per_minute:
            raise HTTPException(429, "too many requests: wait a minute", headers={"Retry-After": "60"})
        window.append(now)


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="avatar-batch jobs", version="1", description=__doc__, docs_url="/docs",
                  openapi_url="/openapi.json", redoc_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    limiter = RateLimit(settings.requests_per_minute)
    bearer = HTTPBearer(auto_error=False)

    def client(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        name = settings.client_of(credentials.credentials) if credentials else None
        if name is None:
            raise HTTPException(401, "a valid bearer token is needed", headers={"WWW-Authenticate": "Bearer"})
        limiter.check(name)
        return name

    Client = Annotated[str, Depends(client)]

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:  # one line, like every refusal
        said = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(said[:3]) or "invalid request"}, status_code=422)

    @app.exception_handler(InputError)
    async def refused(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413 if isinstance(exc, InputTooLarge) else 422)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:  # never a traceback or a path
        logging.getLogger("avatar_batch.api").error("request failed", exc_info=exc)  # the server's log only
        return JSONResponse({"detail": f"the job service failed ({type(exc).__name__}); try again"}, status_code=503)

    def ui(run_id: UUID) -> str | None:
        base = PREFECT_UI_URL.value()
        return f"{base}/runs/flow-run/{run_id}" if base else None

    def created(run) -> JobCreated:
        return JobCreated(job_id=run.id, state=run.state.name if run.state else "Scheduled", ui_url=ui(run.id),
                          status_url=f"/v1/jobs/{run.id}")

    @app.get("/v1/health", summary="Is the API up, and does Prefect answer?")
    def health() -> dict[str, str]:
        with get_client(sync_client=True) as prefect:
            return {"status": "ok", "prefect": "ok" if prefect.api_healthcheck() is None else "unreachable"}

    @app.post("/v1/jobs", status_code=201, responses=ERRORS, summary="Submit a manifest, or one uploaded line",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ManifestJob.model_json_schema(),
                                       "example": ManifestJob.model_config["json_schema_extra"]["examples"][0]},
                  "multipart/form-data": {"schema": {
                      "type": "object", "required": ["portrait", "audio"], "properties": {
                          "portrait": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
                          "audio": {"type": "string", "format": "binary", "description": "WAV, MP3, FLAC, Ogg, M4A"},
                          "prompt": {"type": "string", "maxLength": 1000},
                          "backend": {"type": "string", "enum": list(BACKENDS)}}}}}}})
    async def submit(request: Request, name: Client) -> JobCreated:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                job = ManifestJob.model_validate_json(await request.body())
            except ValueError as exc:
                raise HTTPException(422, "the body must be {manifest_uri, output_uri[, backend]}") from exc
            return await run_in_threadpool(manifest_job, job, name)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > 2 * settings.upload_bytes + 65536:
            raise HTTPException(413, f"the upload is over the limit of {settings.upload_bytes} bytes per file")
        with tempfile.TemporaryDirectory(prefix="avatar-upload-") as folder:
            try:
                files, fields = await read_parts(content_type, request.stream(), Path(folder), settings.upload_bytes,
                                                 files=("portrait", "audio"), fields=("prompt", "backend"))
            except BadUpload as exc:
                raise HTTPException(422, str(exc)) from exc
            return await run_in_threadpool(upload_job, files, fields, name)

    def manifest_job(job: ManifestJob, name: str) -> JobCreated:
        manifest_uri = jobs.allowed(job.manifest_uri, settings.allowed_prefixes)
        output_uri = jobs.allowed(job.output_uri, settings.allowed_prefixes)
        try:
            jobs.check_manifest(manifest_uri, settings.allowed_prefixes)
        except ManifestError as exc:
            raise HTTPException(422, str(exc)) from exc
        return created(jobs.submit(settings, name, manifest_uri, output_uri, job.backend))

    def upload_job(files: dict[str, Path], fields: dict[str, str], name: str) -> JobCreated:
        backend = fields.get("backend") or None
        if backend is not None and backend not in BACKENDS:
            raise HTTPException(422, f"backend must be one of {', '.join(BACKENDS)}")
        portrait_ext = sniff_portrait(files["portrait"], settings.portrait_pixels)
        audio_ext = sniff_audio(files["audio"], settings.audio_seconds)
        manifest_uri, output_uri = jobs.stage_upload(settings, files["portrait"], portrait_ext, files["audio"],
                                                     audio_ext, fields.get("prompt") or None)
        return created(jobs.submit(settings, name, manifest_uri, output_uri, backend))

    def owned_run(prefect, job_id: UUID, name: str):
        try:
            run = prefect.read_flow_run(job_id)
        except RunNotFound as exc:
            raise HTTPException(404, f"no job {job_id}") from exc
        if not jobs.owned(run, name):
            raise HTTPException(403, f"job {job_id} belongs to another client")
        return run

    def summary(run, **more: Any) -> JobStatus:
        return JobStatus(job_id=run.id, state=run.state.name if run.state else "Scheduled",
                         final=bool(run.state and run.state.is_final()), ui_url=ui(run.id), **more)

    def status(prefect, run) -> JobStatus:
        job = jobs.read_job(prefect, run)
        items = [Item(item_id=i.item_id, status=i.status, error_class=i.error_class, error_message=i.error_message,
                      frame_count=i.frame_count,
                      video_url=f"/v1/jobs/{run.id}/items/{i.item_id}" if i.output_uri else None)
                 for i in job.items]
        counts = {"total": len(items), "succeeded": sum(i.status == "succeeded" for i in items),
                  "failed": sum(i.status == "failed" for i in items)} if items else {}
        return summary(run, progress=job.progress, items=items, **counts)

    @app.get("/v1/jobs", responses=ERRORS, summary="This client's recent jobs, newest first")
    def recent(name: Client, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[JobStatus]:
        with get_client(sync_client=True) as prefect:
            return [summary(r) for r in jobs.recent_runs(prefect, name, limit)]

    @app.get("/v1/jobs/{job_id}", responses=ERRORS, summary="A job's state, progress and per-item results")
    def read(job_id: UUID, name: Client) -> JobStatus:
        with get_client(sync_client=True) as prefect:
            return status(prefect, owned_run(prefect, job_id, name))

    @app.get("/v1/jobs/{job_id}/items/{item_id}", responses={**ERRORS, 200: {"content": {"video/mp4": {}}}},
             response_class=FileResponse, summary="The item's MP4 (streamed, or a presigned redirect)")
    def video(job_id: UUID, item_id: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9._-]{1,128}$")], name: Client):
        with get_client(sync_client=True) as prefect:
            run = owned_run(prefect, job_id, name)
            item = next((i for i in jobs.read_job(prefect, run).items if i.item_id == item_id), None)
        if item is None or not item.output_uri:
            raise HTTPException(404, f"job {job_id} has no video for item {item_id!r}")
        uri = item.output_uri
        if storage.is_local(uri):
            return FileResponse(uri, media_type="video/mp4", filename=f"{item_id}.mp4")
        fs, path = storage.filesystem(uri)
        return RedirectResponse(fs.sign(path, expiration=3600), status_code=307)

    return app
