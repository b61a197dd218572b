"""The pipeline's steps run one at a time, each on a pipeline holding only its component, as the batch stages run
them: cached conditioning sampled later gives `generate_latents` bit for bit."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from avatar_model.face.detector import FaceBox
from avatar_model.hunyuan.audio_features import audio_frame_count
from avatar_model.hunyuan.pipeline import AvatarPipeline, AvatarPipelineConfig, PrecomputedConditioning
from avatar_model.hunyuan.presets import COMPONENTS
from avatar_model.hunyuan.prompts import NEGATIVE_PROMPT
from avatar_model.hunyuan.resident import LoadSettings, ResidentModels
from avatar_model.hunyuan.vae import ReferencePosterior, enable_official_tiling
from common.errors import InvalidParameter
from test_pipeline import SIZE, portrait, speech_like

TINY = LoadSettings("tiny-random")
CONFIG = AvatarPipelineConfig(latent_dtype=torch.float16)  # the official latent dtype: casts on every path
PROMPT, SEED, STEPS = "a woman talking", 5, 4  # step 2 of 4 is a cached step


@pytest.fixture(scope="module")
def pool():
    return ResidentModels()


def stage(pool, *components: str, config: AvatarPipelineConfig = CONFIG) -> AvatarPipeline:
    return pool.pipeline(TINY, config, components)


@pytest.fixture(scope="module")
def inputs():
    return portrait(), speech_like(2)


@pytest.fixture(scope="module")
def expected(pool, inputs):
    """The monolithic call on a pipeline with every component."""
    image, audio = inputs
    return stage(pool, *COMPONENTS).generate_latents(image, audio, PROMPT, SEED, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def precomputed(pool, inputs) -> PrecomputedConditioning:
    """Conditioning computed stage by stage and passed through what a cache keeps (CPU tensors, JSON face box,
    the scaling factor as a float32 tensor)."""
    image, audio = inputs
    face = stage(pool, "face_locator").locate_face(image)
    positive, negative = stage(pool, "text_encoder").encode_prompt(PROMPT, NEGATIVE_PROMPT, image)
    hidden = stage(pool, "whisper").encode_whisper(audio)
    posterior = stage(pool, "vae").encode_reference_posterior(image)
    return PrecomputedConditioning(
        positive=positive,
        negative=negative,
        whisper_hidden=hidden.cpu().clone(),
        reference=ReferencePosterior(posterior.parameters.cpu().clone(), float(torch.tensor(posterior.scaling_factor))),
        face=FaceBox.from_dict(json.loads(json.dumps(face.to_dict()))),
        height=SIZE,
        width=SIZE,
        audio_frames=audio_frame_count(len(audio)),
    )


def test_cached_conditioning_sampled_alone_equals_generate_latents(pool, inputs, expected, precomputed):
    latents, frames = stage(pool, "transformer").sample(precomputed, SEED, STEPS)
    assert frames == expected[1] == 50
    assert latents.dtype == torch.float16 and torch.equal(latents, expected[0])

    image, audio = inputs
    whole = stage(pool, *COMPONENTS)
    again, _ = whole.sample(whole.condition(image, audio, PROMPT), SEED, STEPS)
    assert torch.equal(again, expected[0])


def test_the_posterior_split_is_the_sampled_reference_latents(pool, inputs, precomputed):
    image = inputs[0]
    encoder = stage(pool, "vae")
    posterior = encoder.encode_reference_posterior(image)
    assert posterior.parameters.shape == (1, 32, 33, SIZE // 8, SIZE // 8)

    clip = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float().repeat(1, 1, 129, 1, 1) / 127.5 - 1
    with torch.no_grad():
        sample = encoder.vae.encode(clip).latent_dist.sample(generator=torch.Generator().manual_seed(SEED))
    reference = (sample * encoder.vae.config.scaling_factor).to(torch.float16)

    assert torch.equal(encoder.prepare_reference_latents(image, SEED), reference)
    sampler = stage(pool, "transformer")  # no VAE: the scaling factor travels with the posterior
    assert torch.equal(sampler.sample_reference_latents(posterior, SEED), reference)
    assert torch.equal(sampler.sample_reference_latents(precomputed.reference, SEED), reference)  # cached form


def test_callback_runs_after_every_step_and_its_return_is_ignored(pool, expected, precomputed):
    pipe = stage(pool, "transformer")
    calls = []

    def on_step_end(pipeline, i, t, latents):
        calls.append((pipeline, i, float(t), latents.shape))
        return {"latents": torch.zeros_like(latents)}  # a diffusers callback's replacement: ignored here

    latents, _ = pipe.sample(precomputed, SEED, STEPS, callback_on_step_end=on_step_end)
    assert [call[1] for call in calls] == list(range(STEPS))
    assert [call[2] for call in calls] == pipe.scheduler.timesteps.tolist()
    assert all(call[0] is pipe and call[3] == (1, 16, 33, SIZE // 8, SIZE // 8) for call in calls)
    assert torch.equal(latents, expected[0])


def test_a_step_names_the_component_it_misses(pool, inputs, precomputed):
    image, audio = inputs
    empty = AvatarPipeline()
    for call, step, component in [
        (lambda: empty.locate_face(image), "locate_face", "face_locator"),
        (lambda: empty.encode_prompt(PROMPT, NEGATIVE_PROMPT, image), "encode_prompt", "text_encoder"),
        (lambda: empty.encode_whisper(audio), "encode_whisper", "whisper"),
        (lambda: empty.encode_reference_posterior(image), "encode_reference_posterior", "vae"),
        (lambda: stage(pool, "vae").sample(precomputed, SEED, STEPS), "sample", "transformer"),
        (lambda: empty.decode(torch.zeros(1, 16, 2, 8, 8), 5), "decode", "vae"),
    ]:
        with pytest.raises(RuntimeError, match=f"^{step} needs the '{component}' component"):
            call()
    # the face mask needs no VAE: the latent grid is a fixed 1/8 of the pixels
    assert empty.prepare_face_mask(FaceBox(20, 20, 12, 12), SIZE, SIZE).shape == (1, 1, 1, SIZE // 8, SIZE // 8)


def test_vae_tile_px_reaches_the_vae_that_runs(pool):
    latents = torch.zeros(1, 16, 2, SIZE // 8, SIZE // 8)
    small = stage(pool, "vae", config=dataclasses.replace(CONFIG, vae_tile_px=128))
    assert sum(len(chunk) for chunk in small.decode(latents, 5)) == 5
    vae = small.vae
    spatial = (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height,
               vae.tile_sample_stride_width)
    assert vae.use_tiling and spatial == (128, 128, 96, 96)
    assert (vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames) == (64, 48)

    # the VAE is shared: each pipeline sets its own tiles when it runs it
    next(iter(stage(pool, "vae").decode(latents, 5)))
    assert (vae.tile_sample_min_height, vae.tile_sample_stride_height) == (256, 192)
    next(iter(stage(pool, "vae", config=dataclasses.replace(CONFIG, vae_tiling=False)).decode(latents, 5)))
    assert not vae.use_tiling and vae.tile_sample_min_num_frames == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        enable_official_tiling(vae, 100)


def test_inputs_are_checked_before_any_component_runs(inputs):
    """An empty pipeline would name a missing component; the input error comes first."""
    image, audio = inputs
    with pytest.raises(InvalidParameter, match="multiples of 16"):
        AvatarPipeline().condition(np.ascontiguousarray(image[:60]), audio, PROMPT)
    with pytest.raises(InvalidParameter, match="num_inference_steps"):
        AvatarPipeline().generate_latents(image, audio, PROMPT, SEED, num_inference_steps=0)
