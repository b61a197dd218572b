"""`ResidentModels`: one load per component while the settings that shape it hold, one copy per component."""

import dataclasses
import gc
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from avatar_model.hunyuan.pipeline import AvatarPipelineConfig
from avatar_model.hunyuan.presets import COMPONENTS, TINY_TEXT_WIDTH, load_pipeline
from avatar_model.hunyuan.resident import RELEVANT_SETTINGS, LoadSettings, ResidentModels

TINY = LoadSettings("tiny-random")


def replace(**changes) -> LoadSettings:
    return dataclasses.replace(TINY, **changes)


def test_relevant_settings_name_every_component_and_only_load_settings():
    fields = {field.name for field in dataclasses.fields(LoadSettings)}
    assert set(RELEVANT_SETTINGS) == set(COMPONENTS)
    assert all(set(names) <= fields for names in RELEVANT_SETTINGS.values())


def test_each_component_loads_once_while_its_relevant_settings_hold():
    pool = ResidentModels()
    first = {name: pool.get(name, TINY) for name in COMPONENTS}
    assert all(pool.get(name, TINY) is first[name] for name in COMPONENTS)
    # changes that only other components read
    encoders = [name for name in COMPONENTS if name != "transformer"]
    assert all(pool.get(name, replace(group_offload=True)) is first[name] for name in encoders)
    assert pool.get("whisper", replace(dtype="bfloat16")) is first["whisper"]  # Whisper stays fp32
    assert pool.get("face_locator", replace(device="cuda", dtype="bfloat16")) is first["face_locator"]  # CPU only
    assert pool.get("vae", replace(fp8=True)) is first["vae"]
    assert pool.loads == Counter({name: 1 for name in COMPONENTS})
    assert pool.loaded() == frozenset(COMPONENTS)


def test_a_relevant_change_reloads_only_that_component_and_keeps_one_copy():
    pool = ResidentModels()
    pipe = pool.pipeline(TINY, AvatarPipelineConfig(), COMPONENTS)
    old = weakref.ref(pipe.transformer)
    whisper, face_locator = pipe.whisper, pipe.face_locator
    del pipe

    transformer = pool.get("transformer", replace(dtype="bfloat16"))
    assert old() is None, "the fp32 DiT was released before the bf16 one loaded"
    assert transformer.x_embedder.proj.weight.dtype == torch.bfloat16
    assert pool.loads == Counter({"transformer": 2, "face_locator": 1, "whisper": 1, "text_encoder": 1, "vae": 1})
    assert pool.get("whisper", replace(dtype="bfloat16")) is whisper
    assert pool.get("face_locator", replace(dtype="bfloat16")) is face_locator

    offloaded = pool.get("transformer", replace(dtype="bfloat16", group_offload=True))
    assert offloaded._diffusers_hook.get_hook("group_offloading") is not None
    pool.get("face_locator", replace(weights_dir="elsewhere"))
    assert pool.loads == Counter({"transformer": 3, "face_locator": 2, "whisper": 1, "text_encoder": 1, "vae": 1})


def test_release_empties_the_pool_and_the_next_get_loads_again():
    pool = ResidentModels()
    vae = weakref.ref(pool.get("vae", TINY))
    pool.get("whisper", TINY)
    pool.release("vae")
    gc.collect()
    assert pool.loaded() == {"whisper"} and vae() is None
    pool.get("vae", TINY)
    assert pool.loads["vae"] == 2
    pool.release()
    assert pool.loaded() == frozenset()
    with pytest.raises(ValueError, match="unknown component 'llava'"):
        pool.release("llava")
    with pytest.raises(ValueError, match="unknown component"):
        pool.get("llava", TINY)


def test_concurrent_gets_load_once():
    pool = ResidentModels()
    with ThreadPoolExecutor(4) as threads:
        encoders = list(threads.map(lambda _: pool.get("text_encoder", TINY), range(8)))
    assert all(encoder is encoders[0] for encoder in encoders)
    assert pool.loads["text_encoder"] == 1


def test_tiny_weights_do_not_depend_on_the_load_order():
    forward, backward = ResidentModels(), ResidentModels()
    for name in COMPONENTS:
        forward.get(name, TINY)
    for name in reversed(COMPONENTS):
        backward.get(name, TINY)
    whole = load_pipeline("tiny-random")

    def weights(component) -> dict[str, torch.Tensor]:
        module = getattr(component, "model", None) or getattr(component, "llava", None) or component
        return module.state_dict()

    for name in ("whisper", "text_encoder", "transformer", "vae"):
        a = weights(forward.get(name, TINY))
        for b in (weights(backward.get(name, TINY)), weights(getattr(whole, name))):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name

    text_encoder, transformer = forward.get("text_encoder", TINY), forward.get("transformer", TINY)
    widths = {text_encoder.llava.config.text_config.hidden_size, text_encoder.clip.config.hidden_size,
              transformer.config.text_states_dim, transformer.config.text_states_dim_2}
    assert widths == {TINY_TEXT_WIDTH}


def test_load_settings_hold_resolved_values_only():
    assert LoadSettings("tiny-random", weights_dir=Path("weights")) == TINY
    for bad in ({"device": "auto"}, {"dtype": "auto"}, {"dtype": "float64"}, {"preset": "nope"}):
        with pytest.raises(ValueError):
            replace(**bad)


def test_the_pipeline_config_must_use_the_loaded_dit_dtype():
    with pytest.raises(ValueError, match="dtype"):
        ResidentModels().pipeline(TINY, AvatarPipelineConfig(dtype=torch.bfloat16), ["vae"])
