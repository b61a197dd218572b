"""The producers' page (Gradio): upload a portrait and a line, or pick a demo pair, render, watch, play, download.

It is a client of the job API and nothing else: every render is a job submitted there, every state shown is read
from there, every video is fetched from there.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

DEMO = Path(__file__).resolve().parents[1] / "manifests" / "demo"
DEMO_PAIRS = {"astronaut says hello": ("astronaut.png", "hello_en_us.wav"),
              "close-up, the fox": ("astronaut_closeup.jpg", "fox_en_f.wav"),
              "astronaut with pauses": ("astronaut.png", "pauses_en_gb.wav")}
POLL_SECONDS = 1.0


class JobApi:
    """The few calls the page makes, with its token."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url, self.headers, self.timeout = url.rstrip("/"), {"Authorization": f"Bearer {token}"}, timeout

    def submit(self, portrait: Path, audio: Path, backend: str, prompt: str | None) -> dict:
        with portrait.open("rb") as p, audio.open("rb") as a:
            data = {"backend": backend, **({"prompt": prompt} if prompt else {})}
            response = httpx.post(f"{self.url}/v1/jobs", headers=self.headers, timeout=self.timeout, data=data,
                                  files={"portrait": (portrait.name, p), "audio": (audio.name, a)})
        return self._json(response)

    def status(self, job_id: str) -> dict:
        return self._json(httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=self.timeout))

    def recent(self) -> list[dict]:
        return self._json(httpx.get(f"{self.url}/v1/jobs", headers=self.headers, timeout=self.timeout))

    def video(self, path: str, dest: Path) -> Path:
        with httpx.stream("GET", self.url + path, headers=self.headers, timeout=self.timeout,
                          follow_redirects=True) as response:
            if response.status_code != 200:
                raise RuntimeError(f"the video could not be fetched ({response.status_code})")
            with dest.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return dest

    @staticmethod
    def _json(response: httpx.Response):
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise RuntimeError(f"{response.status_code}: {detail}")
        return response.json()


def render(api: JobApi, portrait: str | None, audio: str | None, demo: str | None, backend: str,
           prompt: str) -> Iterator[tuple[str, str | None, str | None]]:
    """Submit, follow and fetch one line: (status text, video path, download path) as it goes."""
    if demo:
        portrait, audio = (str(DEMO / name) for name in DEMO_PAIRS[demo])
    if not portrait or not audio:
        yield "Upload a portrait and an audio clip, or pick a demo pair.", None, None
        return
    try:
        job = api.submit(Path(portrait), Path(audio), backend, prompt.strip() or None)
        yield f"Job {job['job_id']} queued ({job['state']}).", None, None
        while not (status := api.status(job["job_id"]))["final"]:
            progress = f", {status['progress']:.0f} %" if status.get("progress") is not None else ""
            yield f"Job {job['job_id']}: {status['state']}{progress}", None, None
            time.sleep(POLL_SECONDS)
        item = status["items"][0] if status["items"] else None
        if item is None or not item.get("video_url"):
            cause = f"{item['error_class']}: {item['error_message']}" if item else status["state"]
            yield f"Job {job['job_id']} ended {status['state']}: {cause}", None, None
            return
        video = api.video(item["video_url"], Path(tempfile.mkdtemp(prefix="avatar-web-")) / f"{job['job_id']}.mp4")
        yield f"Job {job['job_id']}: {status['state']}, {item['frame_count']} frames.", str(video), str(video)
    except (RuntimeError, httpx.HTTPError) as exc:
        yield f"The job service refused or failed: {exc}", None, None


def recent_rows(api: JobApi) -> list[list[str]]:
    try:
        return [[j["job_id"], j["state"], "yes" if j["final"] else "no"] for j in api.recent()]
    except (RuntimeError, httpx.HTTPError) as exc:
        return [["", f"the job service failed: {exc}", ""]]


def page_theme():
    """System fonts only: the page loads nothing from outside this machine."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_page(api: JobApi, backends: list[str]):
    import gradio as gr

    with gr.Blocks(title="avatar-batch", analytics_enabled=False) as page:
        gr.Markdown("## avatar-batch: a talking portrait from one line")
        with gr.Tab("Render"):
            with gr.Row():
                portrait = gr.Image(type="filepath", label="Portrait (PNG, JPEG or WebP)", elem_id="portrait")
                audio = gr.Audio(type="filepath", label="Line (WAV, MP3, FLAC, Ogg, M4A)", elem_id="audio")
            with gr.Row():
                demo = gr.Dropdown([None, *DEMO_PAIRS], value=None, label="…or a demo pair", elem_id="demo")
                backend = gr.Dropdown(backends, value=backends[0], label="Backend", elem_id="backend")
                prompt = gr.Textbox(label="Prompt (optional)", elem_id="prompt")
            go = gr.Button("Render", variant="primary", elem_id="render")
            status = gr.Markdown(elem_id="status")
            video = gr.Video(label="Result", elem_id="result", interactive=False)
            download = gr.File(label="Download", elem_id="download")
            go.click(lambda *a: (yield from render(api, *a)), [portrait, audio, demo, backend, prompt],
                     [status, video, download])
        with gr.Tab("Recent jobs"):
            table = gr.Dataframe(headers=["job", "state", "final"], interactive=False, elem_id="jobs")
            refresh = gr.Button("Refresh", elem_id="refresh")
            refresh.click(lambda: recent_rows(api), None, table)
            page.load(lambda: recent_rows(api), None, table)
    return page
