"""Multipart bodies the job API reads itself: a malformed one is the client's error (422), never a 503."""

import asyncio

import pytest

from api.uploads import BadUpload, read_parts

BOUNDARY = "4bea7452f2ee0b8418ae8c1020a88206"


async def _chunks(body: bytes):
    yield body


def _read(body: bytes, tmp_path):
    return asyncio.run(read_parts(f"multipart/form-data; boundary={BOUNDARY}", _chunks(body), tmp_path, 1024,
                                  ("portrait", "audio"), ("prompt",)))


def test_a_part_without_headers_is_a_bad_upload(tmp_path):
    # the body schemathesis sent when it found a 503: an opening boundary followed at once by the closing one
    body = f"--{BOUNDARY}\r\n--{BOUNDARY}--\r\n".encode()
    with pytest.raises(BadUpload, match="malformed"):
        _read(body, tmp_path)


def test_a_well_formed_body_reads_its_parts(tmp_path):
    parts = [("portrait", "p.png", b"PNGDATA"), ("audio", "a.wav", b"WAVDATA")]
    body = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{file}"\r\n\r\n'.encode()
                    + data + b"\r\n" for name, file, data in parts)
    body += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello\r\n--{BOUNDARY}--\r\n'.encode()
    saved, texts = _read(body, tmp_path)
    assert {name: path.read_bytes() for name, path in saved.items()} == {"portrait": b"PNGDATA", "audio": b"WAVDATA"}
    assert texts == {"prompt": "hello"}
