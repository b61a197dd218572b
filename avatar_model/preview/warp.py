"""Displacement fields that animate one portrait: jaw drop, eyelids, head sway.

Every effect is a fixed field computed once per portrait; a frame only scales and adds them
(``map = grid + sum(amount_i * field_i)``) and calls ``cv2.remap``. Work is confined to the region the
fields can move, and the rest of the frame is the untouched portrait.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..config import PreviewConfig
from ..face.detector import FaceBox, FaceLandmarks, estimate_landmarks

MOUTH_INTERIOR_RGB = (48.0, 16.0, 20.0)  # dark red-brown of a mouth in shadow
TONGUE_RGB = (150.0, 62.0, 70.0)
LIP_SPREAD = 0.18  # the corners move this share of half the mouth's width at full spread or rounding
LID_PULL = 0.3  # share of a blink done by moving pixels; the rest is the painted lid
MIN_SHIFT_PX = 0.02  # displacements below this are invisible; the region outside them is not remapped


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _flat_bump(u: np.ndarray) -> np.ndarray:
    """1 near 0, falling steeply past |u| = 1 (a flat-topped Gaussian)."""
    u2 = u * u
    return np.exp(-(u2 * u2))


class PortraitWarp:
    """Precomputed fields for one portrait; `frame` renders one set of motion values."""

    def __init__(self, portrait: np.ndarray, face: FaceBox, config: PreviewConfig):
        self.portrait = np.ascontiguousarray(portrait)
        self.config = config
        height, width = portrait.shape[:2]
        self.short_side = min(height, width)
        marks = estimate_landmarks(portrait, face)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)

        self.jaw_px = config.jaw_drop * face.h
        self.lip_ramp_px = max(1.6 * self.jaw_px, 0.06 * face.h)  # > 1.5 x the largest drop: no fold
        jaw = self._jaw_field(xs, ys, face, marks)
        self.eye_px = marks.eye_height
        eyelids = self._eyelid_field(xs, ys, face, marks)
        head = self._head_mask(xs, ys, face)
        pivot_x, pivot_y = face.x + face.w / 2, face.y + 1.6 * face.h
        rotate_x, rotate_y = (ys - pivot_y) * head, -(xs - pivot_x) * head

        spread = _lip_spread_field(xs, ys, face, marks)
        self.spread_px = LIP_SPREAD * 0.5 * marks.mouth_width

        max_angle = math.radians(config.head_rotate_deg)
        max_shift = config.head_shift_px * self.short_side
        reach = np.maximum.reduce([self.jaw_px * jaw, self.eye_px * eyelids, max_angle * np.hypot(rotate_x, rotate_y),
                                   max_shift * head, self.spread_px * np.abs(spread)])
        self.roi = _bounding_box(reach > MIN_SHIFT_PX)
        top, bottom, left, right = self.roi
        crop = (slice(top, bottom), slice(left, right))
        self.grid_x, self.grid_y = xs[crop].copy(), ys[crop].copy()
        self.jaw, self.eyelids, self.head = jaw[crop].copy(), eyelids[crop].copy(), head[crop].copy()
        self.spread = spread[crop].copy()
        self.rotate_x, self.rotate_y = rotate_x[crop].copy(), rotate_y[crop].copy()
        self.map_x = np.empty_like(self.grid_x)
        self.map_y = np.empty_like(self.grid_y)
        self._init_mouth(jaw, marks)
        self.lids = [_Lid(self.portrait, eye, marks.eye_height, 0.13 * face.w) for eye in (marks.left_eye,
                                                                                           marks.right_eye)]

    def _jaw_field(self, xs: np.ndarray, ys: np.ndarray, face: FaceBox, marks: FaceLandmarks) -> np.ndarray:
        """Weight of the downward jaw pull: 0 above the lip line, 1 on lower lip and chin, fading below.

        Between the lips the 0→1 ramp starts at the lip line and is short (but longer than the largest drop,
        so the map never folds): the lip line is stretched open there and shaded as the mouth interior.
        Beside the mouth the ramp spreads over the whole cheek, which stretches gently instead of tearing.
        """
        mouth_x = marks.mouth[0]
        core = _mouth_core(xs, marks)
        wide = 0.5 * face.h
        width = wide + (self.lip_ramp_px - wide) * core
        start = marks.lip_y(xs) - 0.5 * wide * (1.0 - core)
        vertical = _smoothstep((ys - start) / width)
        below_chin = np.maximum(ys - marks.chin_y, 0.0) / (0.35 * face.h)
        vertical *= np.exp(-(below_chin**2))
        return (vertical * _flat_bump((xs - mouth_x) / (0.36 * face.w))).astype(np.float32)

    def _eyelid_field(self, xs: np.ndarray, ys: np.ndarray, face: FaceBox, marks: FaceLandmarks) -> np.ndarray:
        """Weight that pulls the upper lid down over each eye (1 at the lower lid, steep edge below it)."""
        eye_h = marks.eye_height
        total = np.zeros_like(xs)
        for eye_x, eye_y in (marks.left_eye, marks.right_eye):
            lower_lid = eye_y + 0.5 * eye_h
            rise = (ys - (lower_lid - 1.9 * eye_h)) / (1.9 * eye_h)
            fall = 1.0 - (ys - lower_lid) / (0.3 * eye_h)
            vertical = np.where(ys <= lower_lid, _smoothstep(rise), _smoothstep(fall))
            total = np.maximum(total, vertical * _flat_bump((xs - eye_x) / (0.13 * face.w)))
        return total.astype(np.float32)

    @staticmethod
    def _head_mask(xs: np.ndarray, ys: np.ndarray, face: FaceBox) -> np.ndarray:
        """1 over the head (face plus hair), fading smoothly over the neck, shoulders and background."""
        cx, cy = face.x + face.w / 2, face.y + 0.4 * face.h
        radius = np.hypot((xs - cx) / (0.85 * face.w), (ys - cy) / (1.0 * face.h))
        return np.exp(-((np.maximum(radius - 1.0, 0.0) / 0.45) ** 2)).astype(np.float32)

    def _init_mouth(self, jaw: np.ndarray, marks: FaceLandmarks) -> None:
        """Where and how much the jaw field stretches the lip line: that stretch is the open mouth."""
        mouth_x = marks.mouth[0]
        half_w = 0.5 * marks.mouth_width
        lip_rows = marks.lip_y(np.array([mouth_x - half_w, mouth_x, mouth_x + half_w]))
        top = max(self.roi[0], int(lip_rows.min()))
        bottom = min(self.roi[1], int(math.ceil(lip_rows.max() + self.lip_ramp_px)) + 1)
        left = max(self.roi[2], int(mouth_x - half_w) - 1)
        right = min(self.roi[3], int(math.ceil(mouth_x + half_w)) + 2)
        self.mouth_box = (top, bottom, left, right)
        slope = np.gradient(jaw, axis=0)  # d(weight)/dy: source rows per destination row lost to the stretch
        self.mouth_slope = slope[top:bottom, left:right].astype(np.float32) * self.jaw_px
        # the lips part as a lens: an ellipse filling the stretched band, narrowing towards the corners
        rows, cols = np.mgrid[top:bottom, left:right].astype(np.float32)
        across = (cols - mouth_x) / half_w
        down = (rows - marks.lip_y(cols) - 0.5 * self.lip_ramp_px) / (0.5 * self.lip_ramp_px)
        self.mouth_across, self.mouth_down = across, down
        self.mouth_shape = self._mouth_lens(0.0)

    def _mouth_lens(self, width: float) -> np.ndarray:
        """How far each pixel of the mouth box is inside the parted lips (narrower when rounded)."""
        return 1.0 - (self.mouth_across / (1.0 + LIP_SPREAD * width)) ** 2 - self.mouth_down**2

    def frame(self, mouth_open: float, blink: float, rotate_deg: float, dx: float, dy: float,
              mouth_width: float = 0.0) -> np.ndarray:
        """The portrait moved by one frame's motion values, as a new (H, W, 3) uint8 array."""
        angle = math.radians(rotate_deg)
        shift_x, shift_y = dx * self.short_side, dy * self.short_side
        drop = mouth_open * self.jaw_px
        cv2.scaleAdd(self.rotate_x, angle, self.grid_x, dst=self.map_x)
        cv2.scaleAdd(self.head, -shift_x, self.map_x, dst=self.map_x)
        cv2.scaleAdd(self.rotate_y, angle, self.grid_y, dst=self.map_y)
        cv2.scaleAdd(self.head, -shift_y, self.map_y, dst=self.map_y)
        cv2.scaleAdd(self.jaw, -drop, self.map_y, dst=self.map_y)
        if mouth_width:
            cv2.scaleAdd(self.spread, -mouth_width * self.spread_px, self.map_x, dst=self.map_x)
        # the lid mostly slides over the eye (painted below); a slight pull keeps the skin around it alive
        cv2.scaleAdd(self.eyelids, -LID_PULL * blink * self.eye_px, self.map_y, dst=self.map_y)
        out = self.portrait.copy()
        top, bottom, left, right = self.roi
        out[top:bottom, left:right] = cv2.remap(
            self.portrait, self.map_x, self.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        if mouth_open > 0.0:
            self._darken_mouth(out, mouth_open, mouth_width)
        if blink > 0.0:
            for lid in self.lids:
                lid.close(out, blink, shift_x, shift_y)
        return out

    def _darken_mouth(self, out: np.ndarray, mouth_open: float, mouth_width: float) -> None:
        """Paint the gap the jaw opened between the lips (where it stretched the lip line) as the mouth's inside:
        the stretched band of smeared teeth and lips is covered, so nothing streaks."""
        top, bottom, left, right = self.mouth_box
        if bottom <= top or right <= left:
            return
        lens = self._mouth_lens(mouth_width)
        opening = (_smoothstep(lens / 0.7) * _smoothstep((mouth_open * self.mouth_slope - 0.1) / 0.3))[:, :, None]
        region = out[top:bottom, left:right]
        alpha = self.config.mouth_darken * opening
        interior = _mouth_interior(np.clip(lens, 0.0, 1.0), self.mouth_down)
        region[...] = (region * (1.0 - alpha) + interior * alpha + 0.5).astype(np.uint8)


class _Lid:
    """An upper eyelid drawn over one eye: the skin just above the eye, shaded, with a dark lash line at its edge,
    coming down as the blink closes (the eye is covered, not squashed)."""

    def __init__(self, portrait: np.ndarray, eye: tuple[float, float], eye_h: float, half_w: float):
        height, width = portrait.shape[:2]
        eye_x, eye_y = eye
        self.top = max(0, int(eye_y - 0.9 * eye_h))
        self.bottom = min(height, int(math.ceil(eye_y + 0.7 * eye_h)))
        self.left, self.right = max(0, int(eye_x - half_w)), min(width, int(math.ceil(eye_x + half_w)))
        rows, cols = np.mgrid[self.top:self.bottom, self.left:self.right].astype(np.float32)
        # the eye's almond: full in the middle, fading to nothing at the corners and above and below the eye
        self.almond = _smoothstep((1.0 - ((cols - eye_x) / half_w) ** 2 - ((rows - eye_y) / (0.8 * eye_h)) ** 2)
                                  / 0.6)
        self.closed_y = eye_y + 0.3 * eye_h  # where the lid meets the lower lid
        skin_row = max(0, int(eye_y - 1.0 * eye_h))
        skin = portrait[max(0, skin_row - 2):skin_row + 3, self.left:self.right].astype(np.float32).mean(axis=0)
        self.skin = cv2.GaussianBlur(skin[None], (0, 0), sigmaX=max(1.0, 0.15 * half_w))[0] * 0.96
        self.rows = np.arange(self.top, self.bottom, dtype=np.float32)[:, None]
        self.edge = max(1.0, 0.12 * eye_h)

    def close(self, out: np.ndarray, blink: float, shift_x: float, shift_y: float) -> None:
        if self.bottom <= self.top or self.right <= self.left:
            return
        lid_y = self.top + blink * (self.closed_y - self.top)
        cover = _smoothstep((lid_y - self.rows) / self.edge + 0.5) * self.almond
        lash = np.exp(-(((self.rows - lid_y) / self.edge) ** 2)) * blink * self.almond
        colour = self.skin[None, :, :] * (1.0 - 0.55 * lash[:, :, None])
        alpha = np.maximum(cover, lash)[:, :, None]
        top, bottom = self.top + int(round(shift_y)), self.bottom + int(round(shift_y))
        left, right = self.left + int(round(shift_x)), self.right + int(round(shift_x))
        if top < 0 or left < 0 or bottom > out.shape[0] or right > out.shape[1]:
            return
        region = out[top:bottom, left:right]
        region[...] = (region * (1.0 - alpha) + colour * alpha + 0.5).astype(np.uint8)


def _mouth_interior(depth: np.ndarray, down: np.ndarray) -> np.ndarray:
    """The inside of an open mouth, (h, w, 3) float: darkest deep in the middle and lighter towards the lips
    (depth shading), with the back of the tongue rising from the bottom."""
    shade = 1.0 - 0.75 * np.sqrt(depth)  # 1 at the lips, 0.25 deep inside
    interior = np.asarray(MOUTH_INTERIOR_RGB, dtype=np.float32) * (0.55 + 0.9 * shade[:, :, None])
    tongue = (_smoothstep((down - 0.05) / 0.5) * _smoothstep(depth / 0.3))[:, :, None]
    return (interior * (1.0 - 0.7 * tongue) + np.asarray(TONGUE_RGB, dtype=np.float32) * 0.7 * tongue).astype(
        np.float32)


def _lip_spread_field(xs: np.ndarray, ys: np.ndarray, face: FaceBox, marks: FaceLandmarks) -> np.ndarray:
    """Sideways pull of the lips, signed: the corners move out (spread) or in (rounded), the middle stays, and it
    fades over the cheeks and above and below the mouth."""
    across = (xs - marks.mouth[0]) / (0.5 * marks.mouth_width)
    vertical = np.exp(-(((ys - marks.lip_y(xs)) / (0.16 * face.h)) ** 2))
    return (np.clip(across, -1.0, 1.0) * _flat_bump(across / 1.6) * vertical).astype(np.float32)


def _mouth_core(xs: np.ndarray, marks: FaceLandmarks) -> np.ndarray:
    """1 across the middle of the mouth, 0 from its corners outwards: where the lips can part."""
    lens = 1.0 - ((xs - marks.mouth[0]) / (0.5 * marks.mouth_width)) ** 2
    return _smoothstep(lens / 0.4)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the True pixels, never empty (falls back to one pixel)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return 0, 1, 0, 1
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
