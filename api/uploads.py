"""A multipart upload read as it streams in: each part to its own file, stopped at the byte limit.

The request is never held whole: an oversized part ends the read at once (`UploadTooLarge`), and what a part is
comes from its bytes (`sniff_portrait`, `sniff_audio`), never from its file name or declared type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from avatar_model.media.audio import container_format, probe_seconds
from common.errors import InputError, InputTooLarge, UndecodableAudio, UndecodableImage

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
AUDIO_CONTAINERS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "mov,mp4,m4a,3gp,3g2,mj2": "m4a"}
TEXT_FIELD_BYTES = 4096


class UploadTooLarge(InputTooLarge):
    """A part over the limit; the rest of the request is not read."""


class BadUpload(InputError):
    """A request that is not the multipart form the API takes."""


async def read_parts(content_type: str, chunks: AsyncIterator[bytes], folder: Path, limit: int,
                     files: tuple[str, ...], fields: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, str]]:
    """The named file parts (saved under ``folder``) and text fields of a multipart body."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise BadUpload("send multipart/form-data with the parts " + ", ".join(files))
    saved: dict[str, Path] = {}
    texts: dict[str, bytearray] = {}
    state: dict[str, object] = {"header": b"", "name": None, "size": 0, "sink": None}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] = bytes(state["header"]) + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        if bytes(state["header"]).lower() == b"content-disposition":
            _, params = parse_options_header(data[start:end])
            state["name"] = params.get(b"name", b"").decode("utf-8", "replace")

    def on_header_end() -> None:
        state["header"] = b""

    def on_headers_finished() -> None:
        name = state["name"]
        if name in files:
            if name in saved:
                raise BadUpload(f"the part {name!r} was sent twice")
            saved[name] = folder / name
            state["sink"] = saved[name].open("wb")
        elif name in fields:
            texts[name] = bytearray()
        state["size"] = 0

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["size"] = int(state["size"]) + end - start
        name = state["name"]
        if name in files:
            if int(state["size"]) > limit:
                raise UploadTooLarge(f"the part {name!r} is over the upload limit of {limit} bytes")
            state["sink"].write(data[start:end])
        elif name in fields:
            if int(state["size"]) > TEXT_FIELD_BYTES:
                raise UploadTooLarge(f"the field {name!r} is over {TEXT_FIELD_BYTES} bytes")
            texts[name] += data[start:end]

    def on_part_end() -> None:
        if state["sink"] is not None:
            state["sink"].close()
            state["sink"] = None
        state["name"] = None

    parser = MultipartParser(options[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except ParseError as exc:  # a malformed body is the client's fault, never the service's
        raise BadUpload(f"the multipart body is malformed: {exc}") from exc
    finally:
        if state["sink"] is not None:
            state["sink"].close()
    missing = [name for name in files if name not in saved]
    if missing:
        raise BadUpload(f"missing part(s): {', '.join(missing)}")
    try:
        return saved, {name: value.decode() for name, value in texts.items()}
    except UnicodeDecodeError as exc:
        raise BadUpload("text fields must be UTF-8") from exc


def sniff_portrait(path: Path, max_pixels: int) -> str:
    """The portrait's file extension, from its own header; refused if not PNG, JPEG or WebP or too many pixels."""
    try:
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UndecodableImage("portrait: not an image (PNG, JPEG or WebP)") from exc
    if kind not in IMAGE_FORMATS:
        raise UndecodableImage(f"portrait: {kind} images are not taken; send PNG, JPEG or WebP")
    if width * height > max_pixels:
        raise InputTooLarge(f"portrait: {width}x{height} is over the limit of {max_pixels} pixels")
    return IMAGE_FORMATS[kind]


def sniff_audio(path: Path, max_seconds: float) -> str:
    """The clip's extension, from its container as FFmpeg reads it; refused if not audio or too long."""
    seconds, kind = probe_seconds(path, name="audio"), container_format(path, name="audio")
    if kind not in AUDIO_CONTAINERS:
        raise UndecodableAudio(f"audio: the {kind} container is not taken; send WAV, MP3, FLAC, Ogg or M4A")
    if seconds is not None and seconds > max_seconds:
        raise InputTooLarge(f"audio: {seconds:.1f} s is over the limit of {max_seconds:.0f} s")
    return AUDIO_CONTAINERS[kind]
