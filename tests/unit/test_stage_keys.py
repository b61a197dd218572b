"""Stage cache keys: content and output parameters in, operational knobs out; one key per stage, derived once."""

from avatar_model.config import AudioConfig, VideoConfig
from tasks.config import PipelineConfig
from tasks.graph import GRAPHS, Item, item_keys

ITEM = Item(item_id="a", row=0, portrait_uri="p.png", audio_uri="a.wav")


def keys(cfg: PipelineConfig = PipelineConfig(), item: Item = ITEM, portrait: str = "p" * 64) -> dict[str, str]:
    return item_keys(GRAPHS[cfg.backend], cfg, item, portrait, "a" * 64)


def test_every_stage_of_the_graph_has_a_distinct_key_and_the_last_is_the_render_key():
    base = keys()
    assert tuple(base) == GRAPHS["preview"].names
    assert len(set(base.values())) == len(base)


def test_cache_keys_follow_content_and_output_parameters_only():
    base = keys()
    # operational knobs and names leave every key alone
    assert keys(PipelineConfig(max_workers=9, cache_uri="s3://elsewhere")) == base
    assert keys(PipelineConfig(video=VideoConfig(chunk_frames=7, ffmpeg_timeout_s=5))) == base
    assert keys(PipelineConfig(audio=AudioConfig(decode_timeout_s=5))) == base
    assert keys(item=ITEM.model_copy(update={"item_id": "b", "portrait_uri": "q.png"})) == base
    # output parameters change exactly the stages they feed
    crf = keys(PipelineConfig(video=VideoConfig(crf=30)))
    assert crf["prepare_portrait"] == base["prepare_portrait"] and crf["motion"] == base["motion"]
    assert crf["render"] != base["render"] and crf["mux"] != base["mux"]
    seeded = keys(item=ITEM.model_copy(update={"seed": 1}))
    assert seeded["prepare_audio"] == base["prepare_audio"] and seeded["motion"] != base["motion"]
    assert keys(portrait="q" * 64)["prepare_portrait"] != base["prepare_portrait"]
    assert keys(portrait="q" * 64)["motion"] == base["motion"], "preview motion reads only the audio"


def test_diffusion_encoders_are_keyed_on_their_own_inputs_only():
    cfg = PipelineConfig(backend="tiny-random", diffusion={"device": "cpu", "dtype": "float32",
                                                             "step_cache_device": "device"})
    base = keys(cfg)
    reseeded = keys(cfg, item=ITEM.model_copy(update={"seed": 7}))
    assert [s for s in base if base[s] != reseeded[s]] == ["denoise", "decode", "mux", "publish"]
    reprompted = keys(cfg, item=ITEM.model_copy(update={"prompt": "laughs"}))
    assert [s for s in base if base[s] != reprompted[s]] == ["encode_prompt", "denoise", "decode", "mux", "publish"]
    other_portrait = keys(cfg, portrait="q" * 64)
    assert other_portrait["encode_audio"] == base["encode_audio"]
    assert other_portrait["encode_reference"] != base["encode_reference"]
