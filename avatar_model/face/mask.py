"""The face region the audio adapter attends to: the face box enlarged 3x, as a mask on the latent grid."""

import torch
import torch.nn.functional as F

from avatar_model.face.detector import FaceBox


def face_mask(face: FaceBox, height: int, width: int, area: float = 3.0) -> torch.Tensor:
    """Binary mask [1, 1, 1, H, W] of the face box scaled by `area` around its centre, clipped to the image.

    Arithmetic follows the official `get_facemask` on the unrounded box (floor-division centre, truncation to int).
    """
    x1, y1, w, h = (float(v) for v in (face.x, face.y, face.w, face.h))
    x2, y2 = x1 + w, y1 + h
    w, h = (x2 - x1) * area, (y2 - y1) * area
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    left, top = max(cx - w // 2, 0), max(cy - h // 2, 0)
    right, bottom = min(cx + w // 2, width), min(cy + h // 2, height)

    mask = torch.zeros(1, 1, 1, height, width)
    mask[..., int(top) : int(bottom), int(left) : int(right)] = 1.0
    return mask


def latent_face_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask [1, 1, 1, H, W] -> latent grid [1, 1, 1, h, w], bilinear (soft edges) as in the official code."""
    return F.interpolate(mask.float().squeeze(2), size=tuple(latent_hw), mode="bilinear").unsqueeze(2)
