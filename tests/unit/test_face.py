import json

import cv2
import numpy as np
import pytest
from skimage import data

from common.errors import FaceNotFound
from avatar_model.face.detector import FaceBox, detect_face, estimate_landmarks
from avatar_model.media.image import load_image


def test_astronaut_face_is_found(astronaut):
    face = detect_face(astronaut)
    cx, cy = face.center
    # the face spans roughly x 175-270, y 65-160 in the 512x512 photo
    assert abs(cx - 223) < 15 and abs(cy - 113) < 15
    assert 70 <= face.w <= 130 and 70 <= face.h <= 130


def test_large_image_is_detected_in_full_resolution_coordinates(astronaut):
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    small_face, big_face = detect_face(astronaut), detect_face(big)
    assert abs(big_face.center[0] - 2 * small_face.center[0]) < 20
    assert abs(big_face.w - 2 * small_face.w) < 30


def test_second_demo_portrait_has_a_face(demo_dir):
    image = load_image((demo_dir / "astronaut_closeup.jpg").read_bytes())
    face = detect_face(image)
    assert face.w > 0.3 * image.shape[1]


@pytest.mark.parametrize(
    "image",
    [
        data.coffee(),
        np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3)),
        np.full((64, 64, 3), 127, dtype=np.uint8),
    ],
    ids=["coffee", "gradient", "flat"],
)
def test_no_face_raises_instead_of_using_the_frame(image):
    with pytest.raises(FaceNotFound, match=r"^portrait-9: no face found in the portrait$"):
        detect_face(image, "portrait-9")


def test_face_box_round_trips_through_json():
    face = FaceBox(10, 20, 30, 40)
    assert FaceBox.from_dict(json.loads(json.dumps(face.to_dict()))) == face
    assert face.to_dict() == {"x": 10, "y": 20, "w": 30, "h": 40}


def test_float_face_box_round_trips_value_for_value():
    """The official detector's boxes are floats the mask reads unrounded; Haar boxes stay ints."""
    face = FaceBox(10.25, 20.0, 30.123456789012345, 40)
    back = FaceBox.from_dict(json.loads(json.dumps(face.to_dict())))
    assert back == face
    assert [type(v) for v in (back.x, back.y, back.w, back.h)] == [float, float, float, int]


def test_haar_face_box_is_ints(astronaut):
    face = detect_face(astronaut)
    assert all(type(v) is int for v in (face.x, face.y, face.w, face.h))


def test_face_box_geometry_is_inside_the_face():
    face = FaceBox(100, 50, 80, 80)
    mouth_x, mouth_y = face.mouth_center
    (left_x, left_y), (right_x, right_y) = face.eye_centers
    assert mouth_x == 140 and 50 + 0.6 * 80 < mouth_y < 130
    assert 100 < left_x < 140 < right_x < 180 and left_y == right_y < mouth_y
    assert face.scaled(2.0) == FaceBox(200, 100, 160, 160)


def test_landmarks_on_the_astronaut(astronaut):
    face = detect_face(astronaut)
    marks = estimate_landmarks(astronaut, face)
    # eyes near (202, 101) and (246, 103); the lips meet around y 142-147
    assert abs(marks.left_eye[0] - 202) < 8 and abs(marks.right_eye[0] - 246) < 8
    assert abs(marks.left_eye[1] - 102) < 8 and abs(marks.right_eye[1] - 102) < 8
    assert 136 <= marks.mouth[1] <= 150
    assert marks.chin_y > marks.mouth[1]
