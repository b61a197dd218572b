"""The official HunyuanVideo-Avatar face detector (`det_align/detface.pt`), whose box drives the audio mask.

The detector is a YOLOv5-face TorchScript module called as `model(image, grids)`. Pre- and post-processing follow
the official `data_kits/face_align/detface.py`; torchvision is not a dependency, so NMS is written out here.
Departure: when no face is found the official code masks the whole frame; here `FaceNotFound` is raised instead,
because an avatar without a face is an input error the user must fix.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from avatar_model.face.detector import FaceBox
from common.errors import FaceNotFound

INPUT_SHORT_SIDE = 416
STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Faces:
    """Detections in original image pixels, highest score first."""

    boxes: np.ndarray  # [N, 4] x, y, w, h
    landmarks: np.ndarray  # [N, 5, 2] x, y (eyes, nose, mouth corners)
    scores: np.ndarray  # [N] objectness x class score


def detection_grids(height: int, width: int) -> list[torch.Tensor]:
    """Cell-index grids the TorchScript head expects, one per stride: [1, 1, ny, nx, 2] holding (x, y)."""
    grids = []
    for stride in STRIDES:
        ys, xs = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride), indexing="ij")
        grids.append(torch.stack((xs, ys), dim=-1)[None, None].float())
    return grids


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on xyxy boxes [N, 4]; kept indices by descending score (same rule as torchvision.ops.nms)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)  # [N, N]

    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in scores.argsort(descending=True).tolist():
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def filter_detections(
    pred: torch.Tensor, score_threshold: float, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head output [N, 16] (cx, cy, w, h, obj, 10 landmark coords, class) -> xyxy boxes, scores, landmarks.

    As in the official code: objectness must pass the threshold, then score = class x objectness must too.
    """
    if pred.ndim != 2 or pred.shape[1] != 16:
        raise ValueError(f"expected detector rows of 16 values (one class), got {tuple(pred.shape)}")
    pred = pred[pred[:, 4] > score_threshold]
    scores = pred[:, 15] * pred[:, 4]
    pred, scores = pred[scores > score_threshold], scores[scores > score_threshold]
    centre, size = pred[:, :2], pred[:, 2:4]
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    keep = nms(boxes, scores, iou_threshold)
    return boxes[keep], scores[keep], pred[keep, 5:15]


class DetFace:
    """The official TorchScript face detector with its pre- and post-processing.

    It runs on the CPU: one 416-px forward per portrait is fast there, and the accelerator stays free for the DiT.
    """

    def __init__(self, path: str | Path, score_threshold: float = 0.5, iou_threshold: float = 0.45):
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Faces:
        """Detect faces in an RGB uint8 image [H, W, 3]."""
        h0, w0 = image.shape[:2]
        # Short side to 416, each side rounded up to a multiple of 32; a plain resize, no letterbox.
        ratio = INPUT_SHORT_SIDE / min(h0, w0)
        h1, w1 = int(h0 * ratio + 31) // 32 * 32, int(w0 * ratio + 31) // 32 * 32
        resized = cv2.resize(np.ascontiguousarray(image), (w1, h1), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255  # [1, 3, h1, w1] RGB

        pred = self.model(x, detection_grids(h1, w1))[0].float()  # [N, 16]
        boxes, scores, landmarks = filter_detections(pred, self.score_threshold, self.iou_threshold)
        if len(boxes) == 0:
            raise FaceNotFound("no face found in the reference image; use a photo with a clearly visible face")

        # Back to original pixels, in float64 and in the same operation order as the official numpy code.
        corners = boxes.double().numpy().reshape(-1, 2, 2) * [w0, h0] / [w1, h1]  # [N, 2 corners, (x, y)]
        return Faces(
            boxes=np.concatenate([corners[:, 0], corners[:, 1] - corners[:, 0]], axis=1),
            landmarks=landmarks.double().numpy().reshape(-1, 5, 2) * [w0 / w1, h0 / h1],
            scores=scores.double().numpy(),
        )


def pick_face(faces: Faces, rule: Literal["largest", "official"] = "largest") -> FaceBox:
    """The box that drives the mask, with the detector's float coordinates.

    "largest" keeps the largest face. "official" reproduces the official `maxface` loop, which never updates its
    running maximum and so keeps the *last* face larger than the top-scoring one; use it only for parity runs. The
    two agree whenever there is a single face.
    """
    area = faces.boxes[:, 2] * faces.boxes[:, 3]
    if rule == "largest":
        index = int(np.argmax(area))
    elif rule == "official":
        bigger = np.nonzero(area[1:] > area[0])[0]
        index = int(bigger[-1]) + 1 if len(bigger) else 0
    else:
        raise ValueError(f"rule must be 'largest' or 'official', got {rule!r}")
    return FaceBox(*(float(v) for v in faces.boxes[index]))
