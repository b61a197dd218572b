"""Stage cache keys: content and output parameters in, operational knobs out."""

from avatar_model.config import AudioConfig, VideoConfig
from tasks import stages
from tasks.config import PipelineConfig


def test_cache_keys_follow_content_and_output_parameters_only():
    base = stages.item_keys("p" * 64, "a" * 64, 0, None, PipelineConfig())

    def keys(**update):
        return stages.item_keys("p" * 64, "a" * 64, 0, None, PipelineConfig(**update))

    # operational knobs leave every key alone
    assert keys(max_workers=9, cache_uri="s3://elsewhere") == base
    assert keys(video=VideoConfig(chunk_frames=7, ffmpeg_timeout_s=5)) == base
    assert keys(audio=AudioConfig(decode_timeout_s=5)) == base
    # output parameters change exactly the stages they feed
    crf = keys(video=VideoConfig(crf=30))
    assert crf["prepare_portrait"] == base["prepare_portrait"] and crf["generate"] == base["generate"]
    assert crf["decode"] != base["decode"] and crf["mux"] != base["mux"]
    assert stages.item_keys("p" * 64, "a" * 64, 1, None, PipelineConfig())["generate"] != base["generate"]
    assert stages.item_keys("q" * 64, "a" * 64, 0, None, PipelineConfig())["prepare_portrait"] != base["prepare_portrait"]
