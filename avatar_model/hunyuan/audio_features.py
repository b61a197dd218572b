"""Whisper-tiny audio conditioning: 30 s mel chunks -> encoder hidden states -> one 10-step window per video frame.

Departures from the official code (`audio_dataset.get_audio_feature`, `audio_preprocessor.encode_audio`), both
deliberate so that long audio is never cut short silently:
- every 30 s chunk goes through the encoder; the official code encodes only the first 3000 mel frames (30 s);
- there is no 400-frame (16 s) cap; frames whose window runs past the encoded audio read zeros.
"""

import numpy as np
import torch
from transformers import WhisperFeatureExtractor, WhisperModel

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 480_000  # 30 s: whisper's fixed context, i.e. 750 video frames of 640 samples
WINDOW = 10  # encoder steps (20 ms each) per video frame
LEFT_PAD = 4  # zero steps prepended, so frame f sees unpadded steps 2f-4 ... 2f+5


def samples_per_frame(fps: float) -> int:
    """Audio samples per video frame; only the two rates the official code handles are accepted."""
    if fps == 25:
        return 640
    if fps == 12.5:
        return 1280
    raise ValueError(f"fps must be 25 or 12.5 (the rates the audio windows were trained for), got {fps}")


def audio_frame_count(n_samples: int, fps: float = 25.0) -> int:
    """Number of video frames the audio covers (official: n_samples // 640 at 25 fps)."""
    return n_samples // samples_per_frame(fps)


def whisper_input_features(samples_16k: np.ndarray, feature_extractor: WhisperFeatureExtractor) -> torch.Tensor:
    """Log-mel features of 16 kHz mono audio, 30 s at a time: [1, 80, 3000 * n_chunks].

    Each chunk is padded to 3000 frames by the extractor, so chunk k starts exactly at k * 30 s.
    """
    if samples_16k.ndim != 1 or samples_16k.size == 0:
        raise ValueError(f"expected non-empty mono samples, got shape {samples_16k.shape}")
    chunks = [
        feature_extractor(samples_16k[i : i + CHUNK_SAMPLES], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        .input_features
        for i in range(0, samples_16k.size, CHUNK_SAMPLES)
    ]
    return torch.cat(chunks, dim=-1)


@torch.no_grad()
def encode_whisper(whisper: WhisperModel, features: torch.Tensor) -> torch.Tensor:
    """All encoder hidden states (embedding output + every layer), chunk by chunk: [1, 1500 * n_chunks, 5, 384].

    As in HF and the official code, the last entry is after the encoder's final LayerNorm.
    """
    mel_frames = 2 * whisper.config.max_source_positions  # 3000: the encoder only accepts full 30 s chunks
    if features.shape[-1] % mel_frames:
        raise ValueError(f"feature length {features.shape[-1]} is not a multiple of {mel_frames}")
    encoded = []
    for chunk in features.split(mel_frames, dim=-1):
        chunk = chunk.to(device=whisper.device, dtype=whisper.dtype)
        states = whisper.encoder(chunk, output_hidden_states=True).hidden_states  # n_layers + 1 x [1, 1500, C]
        encoded.append(torch.stack(states, dim=2))  # [1, 1500, n_layers + 1, C]
    return torch.cat(encoded, dim=1)


def audio_windows(hidden: torch.Tensor, n_frames: int, fps: float = 25.0) -> torch.Tensor:
    """Per-frame windows of encoder states: [B, T50, L, C] -> [B, n_frames, 10, L, C].

    Frame f takes padded steps [s*f, s*f + 10) after LEFT_PAD zero steps, s = 2 at 25 fps (4 at 12.5 fps).
    """
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    step = 2 * samples_per_frame(fps) // 640  # encoder steps run at 50 Hz
    starts = torch.arange(n_frames, device=hidden.device) * step
    index = starts[:, None] + torch.arange(WINDOW, device=hidden.device)  # [n_frames, 10]

    batch, steps, *rest = hidden.shape
    right_pad = max(0, int(index[-1, -1]) + 1 - (LEFT_PAD + steps))  # windows past the audio read zeros
    padded = torch.cat([hidden.new_zeros(batch, LEFT_PAD, *rest), hidden, hidden.new_zeros(batch, right_pad, *rest)], 1)
    return padded[:, index]  # [B, n_frames, 10, L, C]
