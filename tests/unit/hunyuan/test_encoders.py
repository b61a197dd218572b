"""Encoders and preprocessing of the HunyuanVideo-Avatar port: prompts, whisper windows, face box/mask, LLaVA layout."""

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from avatar_model.face.detector import FaceBox
from avatar_model.face.detface import DetFace, Faces, detection_grids, filter_detections, nms, pick_face
from avatar_model.face.mask import face_mask, latent_face_mask
from avatar_model.hunyuan import prompts
from avatar_model.hunyuan.audio_features import (
    audio_frame_count,
    audio_windows,
    encode_whisper,
    whisper_input_features,
)
from avatar_model.hunyuan.text_encoders import build_tiny_text_encoder, llava_expand_layout, llava_pixels
from common.errors import FaceNotFound

# ---------------------------------------------------------------- prompts


def test_template_is_the_official_one():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert prompts.LLAVA_PROMPT_TEMPLATE == DEFAULT_PROMPT_TEMPLATE["template"]
    assert prompts.LLAVA_CROP_START == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    assert prompts.TEXT_LEN + prompts.LLAVA_CROP_START == 351 and prompts.CLIP_MAX_LENGTH == 77
    assert prompts.llava_prompt("hi").endswith("<|end_header_id|>\n\nhi<|eot_id|>\nThe person looks like<image>")
    assert prompts.user_prompt("A man.") == "Authentic, Realistic, Natural, High-quality, Lens-Fixed, A man."
    assert prompts.user_prompt("") == "Authentic, Realistic, Natural, High-quality, Lens-Fixed."


# ---------------------------------------------------------------- audio


def test_audio_windows_take_steps_2f_minus_4_to_2f_plus_5():
    steps = 20
    # value of step t is t + 1, so a zero can only be padding
    hidden = (torch.arange(steps, dtype=torch.float32) + 1).view(1, steps, 1, 1).expand(1, steps, 5, 3)
    windows = audio_windows(hidden, n_frames=12)
    assert windows.shape == (1, 12, 10, 5, 3)
    for f in range(12):
        expected = [t + 1 if 0 <= t < steps else 0 for t in range(2 * f - 4, 2 * f + 6)]
        assert windows[0, f, :, 0, 0].tolist() == expected
    assert torch.equal(windows[..., 1:, :], windows[..., :1, :].expand_as(windows[..., 1:, :]))


def test_audio_windows_at_12_5_fps_step_two_frames():
    hidden = (torch.arange(40, dtype=torch.float32) + 1).view(1, 40, 1, 1)
    windows = audio_windows(hidden, n_frames=5, fps=12.5)
    assert windows[0, 3, :, 0, 0].tolist() == [t + 1 for t in range(8, 18)]
    assert audio_frame_count(16_000, fps=12.5) == 12


def test_audio_rejects_other_fps():
    with pytest.raises(ValueError, match="25 or 12.5"):
        audio_frame_count(16_000, fps=30)
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(1, 10, 5, 4), n_frames=3, fps=24)


def test_long_audio_keeps_every_frame():
    samples = np.random.default_rng(0).standard_normal(70 * 16_000).astype(np.float32) * 0.1
    features = whisper_input_features(samples, WhisperFeatureExtractor())
    assert features.shape == (1, 80, 3 * 3000)  # three 30 s chunks, the last one padded

    config = WhisperConfig(
        d_model=8,
        encoder_layers=4,
        encoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=16,
    )
    torch.manual_seed(0)
    whisper = WhisperModel(config).eval()
    hidden = encode_whisper(whisper, features)
    assert hidden.shape == (1, 3 * 1500, 5, 8)
    # Chunks are encoded independently: the third equals encoding its 30 s alone.
    alone = encode_whisper(whisper, features[..., 6000:])
    torch.testing.assert_close(hidden[:, 3000:], alone)

    n_frames = audio_frame_count(samples.size)
    assert n_frames == 70 * 25
    windows = audio_windows(hidden, n_frames)
    assert windows.shape == (1, 1750, 10, 5, 8)
    last = 2 * (n_frames - 1) - 4
    torch.testing.assert_close(windows[0, -1], hidden[0, last : last + 10])  # past 30 s, nothing cut


# ---------------------------------------------------------------- face


def test_face_mask_is_the_3x_box_clipped_to_the_image():
    mask = face_mask(FaceBox(100, 50, 40, 60), height=256, width=256)
    assert mask.shape == (1, 1, 1, 256, 256)
    expected = torch.zeros(256, 256)
    expected[0:170, 60:180] = 1  # centre (120, 80), 120 x 180 box, top clipped at 0
    assert torch.equal(mask[0, 0, 0], expected)

    mask = face_mask(FaceBox(200, 10.5, 40.25, 30), height=100, width=230)  # floor-division centre, clipped right
    expected = torch.zeros(100, 230)
    expected[0:70, 160:230] = 1  # cx = 440.25 // 2 = 220, half width = 120.75 // 2 = 60, y 25 +- 45 -> 0..70
    assert torch.equal(mask[0, 0, 0], expected)


def test_latent_face_mask_is_bilinear():
    mask = face_mask(FaceBox(20, 20, 12, 12), height=64, width=64, area=1.0)  # ones on [20, 32)
    latent = latent_face_mask(mask, (8, 8))
    assert latent.shape == (1, 1, 1, 8, 8)
    assert latent[0, 0, 0, 3, 3] == 1 and latent[0, 0, 0, 0, 0] == 0
    assert latent[0, 0, 0, 2, 3] == 0.5  # soft edge: latent row 2 samples pixel row 19.5


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.6])
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]


class _StandIn(torch.nn.Module):
    """Scripted stand-in for detface.pt: fixed rows in network pixels, objectness x mean of the red channel."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows)

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        h, w = img.shape[2], img.shape[3]
        if h % 32 != 0 or w % 32 != 0 or min(h, w) != 416:
            raise RuntimeError("bad input size")
        for grid, stride in zip(grids, [8, 16, 32]):
            if list(grid.shape) != [1, 1, h // stride, w // stride, 2] or bool(grid[0, 0, 0, 1, 0] != 1):
                raise RuntimeError("bad grid")
        rows = self.rows.clone()
        rows[:, 4] = rows[:, 4] * img[0, 0].mean()
        return rows[None]


def _row(cx, cy, w, h, obj, cls):
    return [cx, cy, w, h, obj] + [cx + i for i in range(10)] + [cls]


@pytest.fixture
def detector(tmp_path):
    rows = torch.tensor(
        [
            _row(352, 208, 64, 96, 0.9, 0.8),  # face, score 0.72
            _row(354, 210, 64, 96, 0.9, 0.9),  # same face, better score: NMS keeps this one
            _row(100, 100, 40, 40, 0.9, 0.7),  # second face, 0.63
            _row(500, 300, 40, 40, 0.4, 1.0),  # objectness below 0.5
            _row(600, 100, 40, 40, 0.9, 0.5),  # class x objectness = 0.45 below 0.5
        ]
    )
    path = tmp_path / "detface.pt"
    torch.jit.script(_StandIn(rows)).save(str(path))
    return DetFace(path)


def test_detector_pre_and_post_processing(detector):
    image = np.zeros((300, 500, 3), np.uint8)
    image[..., 0] = 255  # pure red: objectness survives only if the model sees RGB in [0, 1]
    faces = detector(image)  # network input 416 x 704
    sx, sy = 500 / 704, 300 / 416
    np.testing.assert_allclose(faces.scores, [0.81, 0.63], rtol=1e-6)
    np.testing.assert_allclose(faces.boxes[0], [322 * sx, 162 * sy, 64 * sx, 96 * sy], rtol=1e-6)
    np.testing.assert_allclose(faces.boxes[1], [80 * sx, 80 * sy, 40 * sx, 40 * sy], rtol=1e-6)
    np.testing.assert_allclose(faces.landmarks[1, 2], [104 * sx, 105 * sy], rtol=1e-6)

    face = pick_face(faces)  # the detector's floats, unrounded, as the official mask arithmetic reads them
    assert face == FaceBox(*faces.boxes[0].tolist()) and all(type(v) is float for v in (face.x, face.y, face.w))


def test_detector_without_face_raises(detector):
    image = np.zeros((300, 500, 3), np.uint8)
    image[..., 2] = 255  # blue: the stand-in's objectness drops to 0
    with pytest.raises(FaceNotFound):
        detector(image)


def test_filter_and_grids():
    grids = detection_grids(64, 96)
    assert [g.shape for g in grids] == [(1, 1, 8, 12, 2), (1, 1, 4, 6, 2), (1, 1, 2, 3, 2)]
    assert grids[0][0, 0, 2, 5].tolist() == [5, 2]  # (x, y)
    boxes, scores, landmarks = filter_detections(torch.tensor([_row(10, 20, 4, 6, 0.6, 0.9)]), 0.5, 0.45)
    assert boxes.tolist() == [[8, 17, 12, 23]] and landmarks.shape == (1, 10)


def test_pick_face_rules():
    boxes = np.array([[0, 0, 2, 5], [0, 0, 5, 6], [0, 0, 4, 4.0]])  # areas 10, 30, 16
    faces = Faces(boxes=boxes, landmarks=np.zeros((3, 5, 2)), scores=np.array([0.9, 0.8, 0.7]))
    assert pick_face(faces) == FaceBox(0, 0, 5, 6)
    # official maxface never updates its maximum: the last face larger than face 0 wins
    assert pick_face(faces, "official") == FaceBox(0, 0, 4, 4)


# ---------------------------------------------------------------- LLaVA layout and text encoders


def _synthetic_tokens(n_valid: int, image_at: int, length: int = 351, image_id: int = 7, pad_id: int = 0):
    ids = torch.full((1, length), pad_id)
    ids[0, :n_valid] = torch.arange(n_valid) + 100
    ids[0, image_at] = image_id
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, :n_valid] = 1
    return ids, mask


def test_llava_layout_926_to_831():
    n_valid = 120
    ids, mask = _synthetic_tokens(n_valid, image_at=n_valid - 1)  # `<image>` ends the prompt, as in the template
    layout, official = llava_expand_layout(ids, mask, image_token_id=7, n_image_tokens=576, pad_token_id=0)
    assert layout.attention_mask.shape == official.shape == (1, 926)

    image_pos = layout.is_image[0].nonzero().flatten()
    assert image_pos.tolist() == list(range(119, 695))
    assert layout.image_index[0, 119:695].tolist() == list(range(576))
    assert layout.token_index[0, :119].tolist() == list(range(119))
    assert layout.token_index[0, 695:].tolist() == list(range(120, 351))  # pads shifted behind the image
    assert layout.is_pad[0].nonzero().flatten().tolist() == list(range(695, 926))
    assert layout.attention_mask[0].tolist() == [1] * 695 + [0] * 231
    assert layout.position_ids[0].tolist() == list(range(695)) + [1] * 231

    # Official mask quirk: tokenizer mask (351) then 575 ones; after the crop 256 + 575 = 831 entries.
    cropped = official[0, 95:]
    assert cropped.shape == (831,)
    assert cropped.tolist() == [1] * 25 + [0] * 231 + [1] * 575
    assert cropped.sum() == layout.attention_mask[0, 95:].sum()  # same count, different positions

    tokens = torch.arange(351, dtype=torch.float32).view(1, 351, 1)
    image = 1000 + torch.arange(576, dtype=torch.float32).view(1, 576, 1)
    merged = layout.merge(tokens, image)[0, :, 0]
    assert merged[:119].tolist() == list(range(119))
    assert merged[119:695].tolist() == list(range(1000, 1576))
    assert merged[695:].tolist() == [0] * 231  # pad embeddings zeroed like the legacy merge


def test_llava_layout_image_in_the_middle_and_missing():
    ids, mask = _synthetic_tokens(120, image_at=50)
    layout, _ = llava_expand_layout(ids, mask, image_token_id=7, n_image_tokens=576, pad_token_id=0)
    assert layout.is_image[0].nonzero().flatten().tolist() == list(range(50, 626))
    assert layout.token_index[0, 626:695].tolist() == list(range(51, 120))
    assert layout.attention_mask[0].sum() == 119 + 576

    ids[0, 50] = 101  # truncated away
    with pytest.raises(ValueError, match="exactly one <image>"):
        llava_expand_layout(ids, mask, image_token_id=7, n_image_tokens=576)


@pytest.fixture(scope="module")
def text_encoder():
    return build_tiny_text_encoder(seed=0)


def test_tiny_text_encoder_shapes_and_mask(text_encoder):
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pixels = llava_pixels(image)
    assert pixels.shape == (1, 3, 336, 336)

    prompt = prompts.user_prompt("A person talks by a campfire.")
    cond = text_encoder.encode(prompt, pixels)
    n_tokens = len(text_encoder.llava_tokenizer(prompts.llava_prompt(prompt)).input_ids)
    assert cond.text_states.shape == (1, 831, 16)
    assert cond.text_mask.shape == (1, 831) and cond.text_mask.dtype == torch.long
    n_pad = text_encoder.crop_start + 256 - n_tokens
    assert cond.text_mask[0].tolist() == [1] * (n_tokens - text_encoder.crop_start) + [0] * n_pad + [1] * 575
    assert cond.pooled.shape == (1, 16)

    negative = text_encoder.encode(prompts.NEGATIVE_PROMPT, pixels)
    assert not torch.allclose(negative.text_states, cond.text_states)


def test_tiny_text_encoder_matches_transformers_expanded_path(text_encoder):
    """Pre-expanding 576 `<image>` tokens and running transformers' own LLaVA gives the same hidden states."""
    enc = text_encoder
    pixels = llava_pixels(np.full((30, 30, 3), 128, np.uint8))
    states, _ = enc.encode_llava("a person talks", pixels)

    text = prompts.llava_prompt("a person talks")
    tokens = enc.llava_tokenizer(text, max_length=enc.crop_start + 256, padding="max_length", return_tensors="pt")
    image_id, pad_id = enc.llava.config.image_token_id, enc.llava_tokenizer.pad_token_id
    layout, _ = llava_expand_layout(tokens.input_ids, tokens.attention_mask, image_id, 576, pad_id)
    expanded = torch.where(layout.is_image, image_id, tokens.input_ids.gather(1, layout.token_index))
    with torch.no_grad():
        out = enc.llava.model(
            input_ids=expanded,
            pixel_values=pixels,
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            output_hidden_states=True,
        )
    reference = out.hidden_states[-3][:, enc.crop_start :]
    valid = layout.attention_mask[0, enc.crop_start :].bool()
    torch.testing.assert_close(states[0, valid], reference[0, valid])


def test_clip_pooled_is_the_eos_state(text_encoder):
    enc = text_encoder
    tokens = enc.clip_tokenizer("a person talks", max_length=77, padding="max_length", return_tensors="pt")
    eos = tokens.input_ids[0].tolist().index(enc.clip_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    with torch.no_grad():
        hidden = enc.clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(enc.encode_clip("a person talks"), hidden[:, eos])
