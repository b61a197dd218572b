"""`avatar-batch`: render a manifest, write a manifest for a folder, check a manifest.

The CLI is the edge of the system: it is the only place that reads flags and turns them into the typed
`PipelineConfig` handed to the flow.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from manifests import ManifestError, load_manifest
from manifests.folder import manifest_for_folder

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # a message stays one line however narrow the terminal


@app.command()
def render(
    manifest: Annotated[str, typer.Argument(help="manifest URI (path, file://, s3://)")],
    output: Annotated[str, typer.Option("--output", "-o", help="output prefix (path, file://, s3://)")],
    backend: Annotated[Optional[str], typer.Option(help="preview (default) | hunyuan-avatar | tiny-random")] = None,
    cache: Annotated[Optional[str], typer.Option(help="cache prefix; default <output>/.cache")] = None,
    max_workers: Annotated[Optional[int], typer.Option(help="concurrent stage tasks (default 4)")] = None,
    retries: Annotated[Optional[int], typer.Option(help="retries of transient failures per stage (default 3)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="JSON file with a PipelineConfig; flags override it")] = None,
    shard_deployment: Annotated[Optional[str], typer.Option(
        help="spread the manifest over this render-shard deployment's work pool (e.g. render-shard/shard)")] = None,
    rows_per_shard: Annotated[Optional[int], typer.Option(help="rows of one shard (default 100)")] = None,
    dask_address: Annotated[Optional[str], typer.Option(
        help="run the stage tasks on this dask cluster (tcp://host:8786) instead of this process's threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every log line from INFO up")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no bar, no log lines: only the summary")] = False,
) -> None:
    """Render every row of MANIFEST into OUTPUT; exit 1 if any row failed, 2 if the input is unusable."""
    from common.errors import ConfigurationError
    from flows.engines import InThisProcess, task_runner
    from flows.render_manifest import ItemsFailed, render_manifest
    from flows.shards import check_pool, sharded
    from flows.terminal import RenderProgress, failed_rows_table, route_logs
    from tasks.checks import check_locations, prepare_run
    from tasks.config import PipelineConfig

    try:
        base = PipelineConfig.model_validate_json(config.read_text()) if config else PipelineConfig()
        flags = {"backend": backend, "cache_uri": cache, "max_workers": max_workers, "dask_address": dask_address}
        settings = {**base.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
        if retries is not None:
            settings["retry"] = {**settings["retry"], "retries": retries}
        shards = {"deployment": shard_deployment, "rows_per_shard": rows_per_shard}
        settings["shards"] = {**settings["shards"], **{k: v for k, v in shards.items() if v is not None}}
        cfg = PipelineConfig.model_validate(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]configuration rejected:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        rows = load_manifest(manifest)
    except ManifestError as exc:
        console.print(f"[red]manifest rejected:[/red] {exc}")
        raise typer.Exit(2) from exc
    total = len(rows)
    try:  # the flow checks too; here a refusal needs no flow run
        if sharded(cfg.shards, sum(r.error is None for r in rows)):
            check_locations(cfg, output)  # the shards check the rest on their machines
            if warning := check_pool(cfg.shards.deployment):  # the flow run logs it too, for the UI
                console.print(f"[yellow]{warning}[/yellow]", highlight=False)
        else:
            check_locations(prepare_run(cfg), output)
    except ConfigurationError as exc:
        console.print(f"[red]run refused:[/red] {exc}")
        raise typer.Exit(2) from exc

    flow = render_manifest.with_options(task_runner=task_runner(cfg))
    route_logs(console, verbose=verbose, quiet=quiet)
    bar = RenderProgress(console, total, quiet=quiet)
    with bar.shown():
        state = flow(manifest_uri=manifest, output_uri=output, config=cfg, on_item=InThisProcess(bar.item_done),
                     return_state=True)

    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, (ManifestError, ConfigurationError)):
        console.print(f"[red]run refused:[/red] {outcome}")
        raise typer.Exit(2)
    if isinstance(outcome, BaseException) and not isinstance(outcome, ItemsFailed):
        console.print(f"[red]run failed:[/red] {type(outcome).__name__}: {outcome}")
        raise typer.Exit(1)
    if bar.failed:
        console.print(failed_rows_table(bar.failed))
    results = f"{output.rstrip('/')}/results.parquet"
    console.print(f"{total - len(bar.failed)} of {total} succeeded ({bar.counts['cached']} already done) · videos: "
                  f"{output.rstrip('/')}/videos/ · results: {results}")
    if os.environ.get("PREFECT_API_URL"):  # a lasting server (not this command's temporary one): link the run
        from prefect.settings import PREFECT_UI_URL

        console.print(f"flow run: {PREFECT_UI_URL.value()}/runs/flow-run/{state.state_details.flow_run_id}")
    if isinstance(outcome, ItemsFailed):
        raise typer.Exit(1)
    typer.echo(json.dumps(outcome, indent=2))


@app.command("make-manifest")
def make_manifest(
    folder: Annotated[Path, typer.Argument(help="folder with portraits and audio files", exists=True, file_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write")],
    portrait: Annotated[Optional[Path], typer.Option(help="use this portrait for every audio file")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="prompt for every row")] = None,
) -> None:
    """Write a manifest pairing each audio file in FOLDER with its portrait.

    An audio file pairs with the portrait whose name is the longest prefix of its own name
    (``alice_line01.wav`` → ``alice.png``); with a single portrait in the folder, every audio file uses it.
    """
    try:
        frame, skipped = manifest_for_folder(folder, output, portrait=portrait, prompt=prompt)
    except ManifestError as exc:
        console.print(f"[red]no manifest written:[/red] {exc}")
        raise typer.Exit(2) from exc
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} file(s) that are neither image nor audio:[/yellow] "
                      + ", ".join(str(p.relative_to(folder)) for p in skipped[:10]) + (" …" if len(skipped) > 10
                                                                                        else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(output, index=False)
    console.print(f"{len(frame)} rows → {output} (URIs relative to its folder)")


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option(help="last day (inclusive), YYYY-MM-DD")],
    deployment: Annotated[str, typer.Option(help="flow/deployment to run per day")] = "nightly-render/nightly",
    rerun_failed: Annotated[bool, typer.Option("--rerun-failed", help="queue again the days whose run failed, "
                                               "crashed or was cancelled, with the deployment's current "
                                               "parameters")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="follow the runs until all are final")] = False,
) -> None:
    """Queue one run of DEPLOYMENT per day from START to END that has none, and list each day's run.

    Repeating a backfill queues nothing twice; finished items inside a day are skipped anyway by their render
    keys. With --wait the exit code is 1 when a day's run did not complete.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from rich.live import Live

    from common.errors import ConfigurationError
    from flows.backfill import backfill as queue_days
    from flows.backfill import connect, days_between, follow

    try:
        days = days_between(start, end)
        with get_client(sync_client=True) as client:
            connect(client, PREFECT_API_URL.value())
            runs = queue_days(client, deployment, days, rerun_failed)
            if wait:
                with Live(_runs_table(runs), console=console, auto_refresh=False) as live:
                    runs = follow(client, runs, lambda fresh: live.update(_runs_table(fresh), refresh=True))
    except ConfigurationError as exc:
        console.print(f"[red]backfill refused:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not wait:
        console.print(_runs_table(runs))
    if wait and any(r.run.state is None or not r.run.state.is_completed() for r in runs):
        raise typer.Exit(1)


def _runs_table(runs):
    """One line per day: its run, the run's state, whether this command queued it, and its page in the UI."""
    from prefect.settings import PREFECT_UI_URL
    from rich.table import Table

    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    table = Table("day", "flow run", "state", "")
    table.add_column("UI", overflow="fold")  # a link is worth a second line, never an ellipsis
    for r in runs:
        state = r.run.state.name if r.run.state else "-"
        colour = "green" if state == "Completed" else "red" if state in ("Failed", "Crashed", "Cancelled") else ""
        table.add_row(r.day, r.run.name, f"[{colour}]{state}[/{colour}]" if colour else state,
                      "queued" if r.queued else "existing", f"{ui}/runs/flow-run/{r.run.id}" if ui else "")
    return table


@app.command()
def validate(
    manifest: Annotated[str, typer.Argument(help="manifest URI")],
    deep: Annotated[bool, typer.Option("--deep", help="also read, decode and face-check every row's inputs (no "
                                       "rendering)")] = False,
    workers: Annotated[int, typer.Option(help="rows checked at once with --deep")] = 4,
) -> None:
    """Check a manifest without rendering: schema errors exit 2, bad rows exit 1.

    With --deep every row's inputs go through the checks of the render's input stages (the bytes and pixel limits,
    decoding, the audio acceptance rules, the preview's face detector), in parallel.
    """
    try:
        rows = load_manifest(manifest)
    except ManifestError as exc:
        console.print(f"[red]manifest rejected:[/red] {exc}")
        raise typer.Exit(2) from exc
    bad = [(r, r.error) for r in rows if r.error is not None]
    if deep:
        bad += _deep_check([r for r in rows if r.error is None], workers)
    for row, error in sorted(bad, key=lambda pair: pair[0].row):
        console.print(f"[red]row {row.row} ({row.item_id})[/red] {type(error).__name__}: {error}", highlight=False)
    console.print(f"{len(rows)} rows, {len(bad)} invalid" + (" (inputs read, decoded and face-checked)" if deep
                                                               else ""))
    raise typer.Exit(1 if bad else 0)


def _deep_check(rows: list, workers: int) -> list:
    """(row, error) for every row whose inputs the render would refuse; a progress bar while it runs."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from rich.progress import Progress

    from common.errors import AvatarError
    from tasks.config import PipelineConfig
    from tasks.stages.inputs import check_inputs

    cfg = PipelineConfig()
    failures = []
    with Progress(console=console, transient=True) as progress, ThreadPoolExecutor(max(1, workers)) as pool:
        bar = progress.add_task("checking inputs", total=len(rows))
        futures = {pool.submit(check_inputs, r.portrait_uri, r.audio_uri, cfg): r for r in rows}
        for future in as_completed(futures):
            progress.advance(bar)
            try:
                future.result()
            except AvatarError as exc:
                failures.append((futures[future], exc))
    return failures


@app.command()
def setup(
    prefect_file: Annotated[Path, typer.Option(help="deployments to register")] = Path("prefect.yaml"),
    missed_heartbeats: Annotated[int, typer.Option(min=2, help="heartbeats a run may miss before it counts as "
                                                   "crashed (its worker gone)")] = 3,
    pending_timeout: Annotated[int, typer.Option(min=10, help="seconds a run may stay Pending (taken by a worker, "
                                                 "not started) before it counts as crashed")] = 600,
    wait_seconds: Annotated[float, typer.Option(help="how long to wait for the API to answer")] = 0,
) -> None:
    """Make the Prefect server in PREFECT_API_URL ready: work pools, deployments, crash detection (repeatable)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from common.errors import ConfigurationError
    from flows import setup as steps

    api_url = PREFECT_API_URL.value()
    try:
        if not api_url:
            raise ConfigurationError("no Prefect server to set up: set PREFECT_API_URL (or start one with "
                                     "`avatar-batch server start`)")
        if not prefect_file.is_file():
            raise ConfigurationError(f"{prefect_file} not found: run setup from the avatar-batch folder or pass "
                                     "--prefect-file")
        pools, heartbeat = steps.read_deployments(prefect_file)
        with get_client(sync_client=True) as client:
            steps.wait_for_api(client, api_url, wait_seconds)
            for pool in sorted(pools):
                console.print(f"work pool {pool}: {'created' if steps.ensure_work_pool(client, pool) else 'exists'}")
            steps.register_deployments(prefect_file.resolve(), Path(os.environ.get("AVATAR_BATCH_HOME", ".")))
            console.print(f"deployments of {prefect_file}: registered")
            created = steps.ensure_automation(client, steps.crash_automation(heartbeat, missed_heartbeats))
            console.print(f"automation '{steps.CRASH_AUTOMATION}': {'created' if created else 'updated'} (a run "
                          f"silent for {missed_heartbeats} x {heartbeat} s is marked Crashed)")
            created = steps.ensure_automation(client, steps.pending_automation(pending_timeout))
            console.print(f"automation '{steps.PENDING_AUTOMATION}': {'created' if created else 'updated'} (a run "
                          f"Pending for {pending_timeout} s is marked Crashed)")
    except ConfigurationError as exc:
        console.print(f"[red]setup failed:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    deployment: Annotated[str, typer.Option(help="the deployment each job runs")] = "render-manifest/adhoc",
    jobs_prefix: Annotated[Optional[str], typer.Option(help="where uploads and their outputs go "
                                                       "[env AVATAR_BATCH_JOBS_PREFIX]")] = None,
    requests_per_minute: Annotated[int, typer.Option(min=1, help="requests per token per minute")] = 120,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="an origin browsers may call from (repeat); "
                                                             "none by default")] = None,
) -> None:
    """The job API (FastAPI). Tokens: AVATAR_BATCH_API_TOKENS (name=token,…) or the Prefect Secret block named in
    AVATAR_BATCH_API_TOKENS_BLOCK; jobs may name URIs under AVATAR_BATCH_API_ALLOWED (comma-separated prefixes)."""
    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings, parse_tokens
    from common.errors import ConfigurationError

    try:
        block = os.environ.get("AVATAR_BATCH_API_TOKENS_BLOCK")
        if block:
            from prefect.blocks.system import Secret

            raw = Secret.load(block).get()
            text = json.dumps(raw) if isinstance(raw, dict) else str(raw)
        else:
            text = os.environ.get("AVATAR_BATCH_API_TOKENS", "")
        if not text:
            raise ConfigurationError("no API tokens: set AVATAR_BATCH_API_TOKENS (name=token,…) or "
                                     "AVATAR_BATCH_API_TOKENS_BLOCK (a Prefect Secret block)")
        prefix = jobs_prefix or os.environ.get("AVATAR_BATCH_JOBS_PREFIX")
        if not prefix:
            raise ConfigurationError("no jobs prefix: pass --jobs-prefix or set AVATAR_BATCH_JOBS_PREFIX")
        prefix = prefix if "://" in prefix else os.path.abspath(prefix)
        allowed = tuple(p for p in os.environ.get("AVATAR_BATCH_API_ALLOWED", "").split(",") if p)
        settings = ApiSettings(tokens=parse_tokens(text), deployment=deployment, jobs_prefix=prefix,
                               allowed_prefixes=(prefix, *allowed), requests_per_minute=requests_per_minute,
                               cors_origins=tuple(cors_origin or ()))
    except (ConfigurationError, ValueError) as exc:
        console.print(f"[red]api not started:[/red] {exc}")
        raise typer.Exit(2) from exc
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@app.command()
def web(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 7860,
    api_url: Annotated[str, typer.Option(help="the job API the page submits to")] = "http://127.0.0.1:8000",
) -> None:
    """The producers' page (Gradio) over the job API; its token is AVATAR_BATCH_WEB_TOKEN."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from api.web import JobApi, build_page, page_theme
    from tasks.graph import BACKENDS
    from tasks.models import cuda_available

    token = os.environ.get("AVATAR_BATCH_WEB_TOKEN", "")
    if not token:
        console.print("[red]web not started:[/red] set AVATAR_BATCH_WEB_TOKEN to a token of the job API")
        raise typer.Exit(2)
    # what this host can offer: the CPU backends, and the released model where a GPU is
    backends = [b for b in BACKENDS if b != "hunyuan-avatar" or cuda_available()]
    page = build_page(JobApi(api_url, token), ["preview", *(b for b in backends if b != "preview")])
    page.queue().launch(server_name=host, server_port=port, share=False, show_error=False, quiet=True,
                        theme=page_theme())


server_app = typer.Typer(no_args_is_help=True, help="This machine's Prefect server in the background (history and "
                                                   "UI persist; every command uses it while it is up).")
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(port: Annotated[int, typer.Option(help="port of the API and the UI")] = 4200) -> None:
    """Start the server (SQLite under ~/.avatar-batch, telemetry off) unless it is up; print its UI link."""
    from flows import local_server

    try:
        server = local_server.start(port)
    except RuntimeError as exc:
        console.print(f"[red]server not started:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"Prefect server up: UI {server.ui_url}  API {server.api_url}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the background server (its history stays for the next start)."""
    from flows import local_server

    stopped = local_server.stop()
    console.print(f"stopped the server on port {stopped.port}" if stopped else "no server was running")


@server_app.command("status")
def server_status() -> None:
    """Say whether the server is up and where; exit 1 when it is not."""
    from flows import local_server

    server = local_server.running()
    if server is None:
        console.print("no server running; commands start a temporary one (`avatar-batch server start`)")
        raise typer.Exit(1)
    console.print(f"Prefect server up: UI {server.ui_url}  API {server.api_url} (pid {server.pid})")


weights_app = typer.Typer(no_args_is_help=True, help="Check the checkpoints of the hunyuan-avatar backend.")
app.add_typer(weights_app, name="weights")


@weights_app.command("check")
def weights_check(
    fp8: Annotated[bool, typer.Option("--fp8", help="check the fp8 transformer and its scale map")] = False,
    weights_dir: Annotated[Path, typer.Option(help="folder holding ckpts/ (weights/README.md)")] = Path("weights"),
) -> None:
    """Presence and sizes of every file of the official layout, transformer keys and shapes by a meta-device load,
    and the fp8 map's keys; exit 2 if anything is missing or wrong (a render of hunyuan-avatar runs this first)."""
    from avatar_model.hunyuan.weights_check import check_weights

    report = check_weights(weights_dir, fp8=fp8)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 2)


def main() -> None:
    """Console entry point: run the command, then end the process without native static teardown.

    pyarrow's thread pools can abort the interpreter's final teardown ("terminate called without an active
    exception", apache/arrow#34314), turning a finished command into exit -6. So: run the atexit handlers
    (Prefect stops its temporary server and flushes run history there), flush stdio, and `os._exit` with the
    command's own exit code.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry (an ERROR line offline)
    private_db = None
    if not os.environ.get("PREFECT_API_URL"):
        from flows import local_server

        server = local_server.running()
        if server is not None:  # before Prefect reads its settings
            os.environ["PREFECT_API_URL"] = server.api_url
        elif "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in os.environ:
            # the temporary server of this command gets a database of its own: two commands at once never lock
            # each other out of a shared SQLite file
            private_db = tempfile.mkdtemp(prefix="avatar-batch-prefect-")
            os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{private_db}/prefect.db"
            # a fresh database is migrated first: on a busy machine that outlasts Prefect's default wait
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:  # send the run's last log lines while the (temporary) API is still up
        handlers.APILogWorker.drain_all(timeout=5)
    atexit._run_exitfuncs()
    if private_db:
        shutil.rmtree(private_db, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
