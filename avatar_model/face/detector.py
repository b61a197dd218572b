"""Offline face detection (OpenCV Haar cascades) and the facial landmarks the preview warp needs.

Haar gives a face box only. Eyes come from OpenCV's eye cascade inside the box and the lip line from the
darkest row of the mouth area; both fall back to the usual proportions of a frontal face box.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from common.errors import FaceNotFound

logger = logging.getLogger(__name__)

MIN_FACE_FRACTION = 0.08  # of the image's short side
DETECT_MIN_SHORT_SIDE = 256  # smaller portraits are enlarged for detection
DETECT_MAX_SIDE = 640  # larger images are detected on a downscaled copy

# Typical positions inside a Haar frontal-face box, as fractions of its width/height.
EYE_X = (0.30, 0.70)
EYE_Y = 0.38
MOUTH_Y = 0.82
MOUTH_WIDTH = 0.45
CHIN_Y = 1.15


@dataclass(frozen=True)
class FaceBox:
    """A face rectangle in pixels of the image it was detected in.

    Haar boxes are ints (the preview warp indexes pixels with them); the official detector's boxes stay floats,
    because the official mask arithmetic uses them unrounded.
    """

    x: int | float
    y: int | float
    w: int | float
    h: int | float

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def mouth_center(self) -> tuple[float, float]:
        """Estimated point between the lips."""
        return self.x + self.w / 2, self.y + MOUTH_Y * self.h

    @property
    def mouth_width(self) -> float:
        return MOUTH_WIDTH * self.w

    @property
    def eye_centers(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Estimated (left-in-image, right-in-image) eye centres."""
        eye_y = self.y + EYE_Y * self.h
        return (self.x + EYE_X[0] * self.w, eye_y), (self.x + EYE_X[1] * self.w, eye_y)

    @property
    def chin_y(self) -> float:
        return self.y + CHIN_Y * self.h

    def scaled(self, factor: float) -> FaceBox:
        """The same box in an image resized by ``factor``."""
        return FaceBox(*(int(round(v * factor)) for v in (self.x, self.y, self.w, self.h)))

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FaceBox:
        """Inverse of `to_dict`, value for value (a JSON int stays an int, a float a float)."""
        return cls(x=data["x"], y=data["y"], w=data["w"], h=data["h"])


@dataclass(frozen=True)
class FaceLandmarks:
    """Points (x, y) in pixels that drive the preview warp."""

    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    eye_height: float
    mouth: tuple[float, float]
    mouth_width: float
    chin_y: float
    lip_slope: float = 0.0
    lip_curvature: float = 0.0

    def lip_y(self, x: np.ndarray | float) -> np.ndarray | float:
        """Row of the line where the lips meet, at column ``x``."""
        dx = x - self.mouth[0]
        return self.mouth[1] + self.lip_slope * dx + self.lip_curvature * dx * dx


def _cascade(file_name: str) -> cv2.CascadeClassifier:
    """The cascade for this thread: one classifier must not run in two threads at once (it crashes the process)."""
    return _thread_cascade(file_name, threading.get_ident())


@functools.lru_cache(maxsize=64)
def _thread_cascade(file_name: str, thread_id: int) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + file_name)
    if cascade.empty():
        raise RuntimeError(f"OpenCV cascade {file_name} is missing (opencv-python-headless<5 ships it)")
    return cascade


def _equalized_gray(image: np.ndarray) -> np.ndarray:
    return cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


def detect_face(image: np.ndarray, name: str = "image") -> FaceBox:
    """The largest frontal face in an RGB image; raises `FaceNotFound` rather than guessing."""
    height, width = image.shape[:2]
    # the cascade works best on faces of tens to hundreds of pixels: shrink big images, enlarge small ones
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    scale = max(scale, DETECT_MIN_SHORT_SIDE / min(height, width))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
    min_side = max(20, int(MIN_FACE_FRACTION * min(small.shape[:2])))
    faces = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        _equalized_gray(small), scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        raise FaceNotFound(f"{name}: no face found in the portrait")
    x, y, w, h = max(faces, key=lambda box: box[2] * box[3])
    face = FaceBox(int(x), int(y), int(w), int(h)).scaled(1.0 / scale)
    logger.debug("%s: face %s among %d candidates", name, face, len(faces))
    return face


def estimate_landmarks(image: np.ndarray, face: FaceBox) -> FaceLandmarks:
    """Eye centres and lip line for ``face``, refined on the image where the evidence is clear."""
    gray = _equalized_gray(image)
    left_eye, right_eye = _find_eyes(gray, face) or face.eye_centers
    lip_y, lip_slope, lip_curvature = _find_lip_line(gray, face)
    return FaceLandmarks(
        left_eye=left_eye,
        right_eye=right_eye,
        eye_height=0.09 * face.h,
        mouth=(face.mouth_center[0], lip_y),
        mouth_width=face.mouth_width,
        chin_y=face.chin_y,
        lip_slope=lip_slope,
        lip_curvature=lip_curvature,
    )


def _find_eyes(gray: np.ndarray, face: FaceBox) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Two eyes from the eye cascade in the upper face, one per half, or None when unclear."""
    top, bottom = face.y + int(0.15 * face.h), face.y + int(0.55 * face.h)
    region = gray[max(0, top) : bottom, max(0, face.x) : face.x + face.w]
    if region.size == 0:
        return None
    min_side = max(8, int(0.15 * face.w))
    eyes = _cascade("haarcascade_eye.xml").detectMultiScale(region, 1.05, 3, minSize=(min_side, min_side))
    centers = [(float(face.x + ex + ew / 2), float(max(0, top) + ey + eh / 2)) for ex, ey, ew, eh in eyes]
    mid = face.x + face.w / 2
    left = [c for c in centers if c[0] < mid]
    right = [c for c in centers if c[0] >= mid]
    if not left or not right:
        return None
    left_eye = min(left, key=lambda c: abs(c[0] - (face.x + EYE_X[0] * face.w)))
    right_eye = min(right, key=lambda c: abs(c[0] - (face.x + EYE_X[1] * face.w)))
    if abs(left_eye[1] - right_eye[1]) > 0.12 * face.h:
        return None
    return left_eye, right_eye


def _find_lip_line(gray: np.ndarray, face: FaceBox) -> tuple[float, float, float]:
    """The lip line as y = y0 + slope * dx + curvature * dx**2 (dx from the mouth centre).

    Across the mouth, each of five vertical bands votes for its darkest local minimum near the expected
    mouth (the gap or shadow between the lips); a quadratic through the votes follows a smile or a tilt.
    """
    estimate = face.mouth_center[1]
    top = int(max(0, face.y + 0.72 * face.h))
    bottom = int(min(gray.shape[0], face.y + 0.95 * face.h))
    cx = face.x + face.w / 2
    band_w = face.mouth_width / 6
    offsets, rows = [], []
    for step in (-2, -1, 0, 1, 2):
        left = int(max(0, cx + (step - 0.5) * band_w))
        right = int(min(gray.shape[1], cx + (step + 0.5) * band_w))
        band = gray[top:bottom, left:right].astype(np.float32)
        if band.shape[0] < 3 or band.shape[1] < 1:
            continue
        profile = np.convolve(band.mean(axis=1), np.ones(3) / 3, mode="valid")
        minima = np.flatnonzero((profile[1:-1] < profile[:-2]) & (profile[1:-1] <= profile[2:])) + 1
        if len(minima) == 0:
            continue  # only a slope across the window: no lip line in this band
        offsets.append((left + right) / 2 - cx)
        rows.append(top + 1 + float(minima[np.argmin(profile[minima])]))
    if len(rows) < 3:
        return estimate, 0.0, 0.0
    curvature, slope, center = np.polyfit(offsets, rows, 2)
    # keep the curve plausible: corners at most 8% of the face height above or below the centre
    half_w = face.mouth_width / 2
    curvature = float(np.clip(curvature, -0.08 * face.h / half_w**2, 0.08 * face.h / half_w**2))
    slope = float(np.clip(slope, -0.15, 0.15))
    return float(center), slope, curvature
