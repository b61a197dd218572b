"""Text conditioning: LLaVA-Llama-3 hidden states (prompt + reference image) and the CLIP-L pooled prompt.

The official code relies on transformers 4.45's "legacy" LLaVA path, which replaces the single `<image>` token by
576 image features (351 tokens -> 926 positions, pads last). Newer transformers expect 576 placeholder tokens and
refuse one. So the expansion is done here, position for position as the legacy merge did it (pad embeddings zeroed,
position ids = running count of valid positions, 1 on pads), and only the language model is run by transformers.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from avatar_model.hunyuan import prompts

LLAVA_IMAGE_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.4082107)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextConditioning:
    """What the DiT reads from the text side, for one prompt."""

    text_states: torch.Tensor  # [1, 831, 4096] LLaVA hidden state -3 after the template crop
    text_mask: torch.Tensor  # [1, 831] the official mask (see `llava_expand_layout`), int64
    pooled: torch.Tensor  # [1, 768] CLIP-L pooler output


@dataclass(frozen=True)
class LlavaLayout:
    """Source of every position of the expanded sequence; all fields [B, L + n_image - 1]."""

    token_index: torch.Tensor  # index into input_ids (meaningful where not is_image)
    image_index: torch.Tensor  # index into the image features (meaningful where is_image)
    is_image: torch.Tensor  # bool
    is_pad: torch.Tensor  # bool: pad tokens, whose embeddings the legacy merge zeroed
    attention_mask: torch.Tensor  # the true mask of the expanded sequence, for the language model
    position_ids: torch.Tensor  # running count of valid positions; 1 on pads (legacy rule)

    def merge(self, token_embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """[B, L, D] token embeddings + [B, n_image, D] image features -> [B, L + n_image - 1, D]."""
        dim = token_embeds.shape[-1]
        text = token_embeds.gather(1, self.token_index[..., None].expand(-1, -1, dim))
        image = image_features.to(token_embeds).gather(1, self.image_index[..., None].expand(-1, -1, dim))
        merged = torch.where(self.is_image[..., None], image, text)
        return merged.masked_fill(self.is_pad[..., None], 0)


def llava_expand_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    n_image_tokens: int,
    pad_token_id: int | None = None,
) -> tuple[LlavaLayout, torch.Tensor]:
    """Layout of the legacy single-`<image>` expansion, and the official text mask.

    input_ids, attention_mask: [B, L] right-padded, exactly one `<image>` per row at position p. The expanded
    sequence holds tokens [0, p), the n_image features, then tokens (p, L) shifted by n_image - 1.

    The official mask is the tokenizer mask followed by n_image - 1 ones, [B, L + n_image - 1]. Its count of ones is
    right but its positions are not (the image features sit before the padding, the ones come after it). The DiT
    only counts it; the token refiner uses the positions; the checkpoint was trained with it, so keep it as is.
    """
    is_token = input_ids == image_token_id
    if (is_token.sum(1) != 1).any():
        raise ValueError(
            "each LLaVA prompt needs exactly one <image> token; a prompt longer than the text length (about 240 "
            "tokens) truncates it away, so shorten the prompt"
        )
    batch, length = input_ids.shape
    image_pos = is_token.int().argmax(1, keepdim=True)  # [B, 1]
    pos = torch.arange(length + n_image_tokens - 1, device=input_ids.device)[None]  # [1, L']
    is_image = (pos >= image_pos) & (pos < image_pos + n_image_tokens)
    token_index = torch.where(pos < image_pos, pos, pos - (n_image_tokens - 1)).clamp(0, length - 1)
    image_index = (pos - image_pos).clamp(0, n_image_tokens - 1)

    mask = torch.where(is_image, 1, attention_mask.gather(1, token_index))
    is_pad = torch.zeros_like(is_image)
    if pad_token_id is not None:
        is_pad = ~is_image & (input_ids.gather(1, token_index) == pad_token_id)
    layout = LlavaLayout(
        token_index=token_index,
        image_index=image_index,
        is_image=is_image,
        is_pad=is_pad,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1),
    )
    official_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n_image_tokens - 1)], dim=1)
    return layout, official_mask


def template_crop_start(tokenizer: PreTrainedTokenizerBase, template: str = prompts.LLAVA_PROMPT_TEMPLATE) -> int:
    """Tokens before the prompt in the template (BOS + system turn + user header); 95 for the Llama-3 tokenizer.

    Worth checking when loading a tokenizer: a tokenizer that does not add BOS would shift the crop by one.
    """
    return len(tokenizer(template.split("{}")[0]).input_ids)


def llava_pixels(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> [1, 3, 336, 336]: bilinear squash (aspect not kept), CLIP mean/std.

    Same as the official torchvision transform on a PIL image; the official code feeds it the bucket-resized
    reference image, not the original file.
    """
    resized = Image.fromarray(image).convert("RGB").resize((LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None]


class AvatarTextEncoder:
    """LLaVA (prompt in the video template + reference image) and CLIP-L (bare prompt) encoders.

    `crop_start` is the token count of BOS + the template's system turn and user header: 95 for the released
    Llama-3 tokenizer; tiny test tokenizers compute their own.
    """

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        llava_tokenizer: PreTrainedTokenizerBase,
        clip: CLIPTextModel,
        clip_tokenizer: PreTrainedTokenizerBase,
        crop_start: int = prompts.LLAVA_CROP_START,
        text_len: int = prompts.TEXT_LEN,
        clip_max_length: int = prompts.CLIP_MAX_LENGTH,
        hidden_state_skip_layer: int = 2,
    ):
        self.llava, self.llava_tokenizer = llava.eval(), llava_tokenizer
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.crop_start = crop_start
        self.text_len = text_len
        self.clip_max_length = clip_max_length
        self.hidden_state_skip_layer = hidden_state_skip_layer

    @torch.no_grad()
    def encode(self, prompt: str, llava_pixels: torch.Tensor) -> TextConditioning:
        """Encode one final prompt (prefix already applied for the positive branch) with the reference image."""
        text_states, text_mask = self.encode_llava(prompt, llava_pixels)
        return TextConditioning(text_states=text_states, text_mask=text_mask, pooled=self.encode_clip(prompt))

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, 336, 336] -> projected patch features [1, 576, D] (vision layer -2, CLS dropped)."""
        model, config = self.llava.model, self.llava.config
        pixels = pixels.to(device=model.vision_tower.device, dtype=model.vision_tower.dtype)
        features = model.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return model.multi_modal_projector(features)

    @torch.no_grad()
    def encode_llava(self, prompt: str, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaVA hidden state -(skip + 1), no final norm, cropped: [1, L + 575 - crop, D] and the official mask."""
        model = self.llava.model
        tokens = self.llava_tokenizer(
            prompts.llava_prompt(prompt),
            max_length=self.crop_start + self.text_len,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        device = model.language_model.device
        input_ids, attention_mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)

        image_features = self.image_features(pixels)  # [1, 576, D]
        layout, official_mask = llava_expand_layout(
            input_ids,
            attention_mask,
            self.llava.config.image_token_id,
            image_features.shape[1],
            self.llava_tokenizer.pad_token_id,
        )
        embeds = layout.merge(model.get_input_embeddings()(input_ids), image_features)  # [1, L + 575, D]
        out = model.language_model(
            inputs_embeds=embeds,
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            output_hidden_states=True,
        )
        states = out.hidden_states[-(self.hidden_state_skip_layer + 1)]
        return states[:, self.crop_start :], official_mask[:, self.crop_start :]

    @torch.no_grad()
    def encode_clip(self, prompt: str) -> torch.Tensor:
        """CLIP-L pooler output (EOS state after the final LayerNorm, not the projection): [1, 768]."""
        tokens = self.clip_tokenizer(
            prompt, max_length=self.clip_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.clip.device)
        return self.clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output


def _word_tokenizer(specials: list[str], template: str, pad: str) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over the words of the official prompt strings, built in code."""
    text = " ".join([prompts.LLAVA_PROMPT_TEMPLATE, prompts.LLAVA_IMAGE_SUFFIX, prompts.PROMPT_PREFIX])
    text += " " + prompts.NEGATIVE_PROMPT
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", re.sub(r"<\|?\w+\|?>", " ", text).lower())))
    # Specials first: transformers reads a CLIP eos_token_id of 2 as a legacy config and pools at argmax(ids).
    vocab = {token: i for i, token in enumerate([*specials, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token=pad, padding_side="right")


def build_tiny_text_encoder(seed: int = 0) -> AvatarTextEncoder:
    """Random tiny LLaVA (Llama + CLIP vision) and CLIP text model with code-built tokenizers; no downloads.

    Same layout as the released encoders (336 px image -> 576 features, 256 + 575 = 831 positions after the
    crop); the crop is this tokenizer's own count of template-prefix tokens.
    """
    llava_tokenizer = _word_tokenizer(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "<pad>"],
        template="<|begin_of_text|> $A",
        pad="<pad>",
    )
    clip_tokenizer = _word_tokenizer(
        ["<|startoftext|>", "<|endoftext|>"], template="<|startoftext|> $A <|endoftext|>", pad="<|endoftext|>"
    )
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    language = LlamaConfig(
        vocab_size=len(llava_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=llava_tokenizer.pad_token_id,
    )
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=prompts.CLIP_MAX_LENGTH,
        bos_token_id=clip_tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=clip_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llava = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision,
                text_config=language,
                image_token_index=llava_tokenizer.convert_tokens_to_ids("<image>"),
                image_seq_length=(LLAVA_IMAGE_SIZE // vision.patch_size) ** 2,
            )
        )
        clip = CLIPTextModel(clip_config)
    return AvatarTextEncoder(
        llava, llava_tokenizer, clip, clip_tokenizer, crop_start=template_crop_start(llava_tokenizer)
    )
