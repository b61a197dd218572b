"""Prompt strings and lengths of the official HunyuanVideo-Avatar text conditioning.

These are data, copied verbatim from the official release (`hymm_sp/constants.py`, `audio_dataset.py`,
`sample_inference_audio.py`, `text_encoder/__init__.py`): the checkpoint was trained on exactly these tokens, so
any rewording changes the conditioning.
"""

# Prepended to every user prompt (positive branch only; the negative prompt gets no prefix).
PROMPT_PREFIX = "Authentic, Realistic, Natural, High-quality, Lens-Fixed, "

# Used by the official Gradio path when no prompt is given.
EMPTY_PROMPT = "Authentic, Realistic, Natural, High-quality, Lens-Fixed."

# "li-dit-encode-video": a Llama-3 chat system turn plus a user turn holding the prompt. Identical to the base
# HunyuanVideo PROMPT_TEMPLATE_ENCODE_VIDEO and to diffusers' HunyuanVideo DEFAULT_PROMPT_TEMPLATE (a test pins it).
LLAVA_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)

# Tokens of BOS + system turn + user header, dropped from the LLaVA hidden states (Llama-3 tokenizer).
LLAVA_CROP_START = 95

# Appended after the template; `<image>` is where LLaVA's 576 image features go.
LLAVA_IMAGE_SUFFIX = "\nThe person looks like<image>"

# The official `--neg-prompt` flag is ignored; this hard-coded string is what the unconditional branch encodes.
NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, "
    "bad eyes, bad limbs, distortion, blurring, Lens changes"
)

TEXT_LEN = 256  # LLaVA tokens kept after the crop (tokenizer max_length = TEXT_LEN + LLAVA_CROP_START)
CLIP_MAX_LENGTH = 77


def user_prompt(text: str) -> str:
    """The positive prompt as the official code builds it: prefix + text, or the Gradio path's prefix-only prompt
    when there is no text."""
    return PROMPT_PREFIX + text if text else EMPTY_PROMPT


def llava_prompt(prompt: str) -> str:
    """The full LLaVA input string: template around the prompt, then the image suffix."""
    return LLAVA_PROMPT_TEMPLATE.format(prompt) + LLAVA_IMAGE_SUFFIX
