"""Vision-language architectures on tiny random configs: only the language model is manipulated,
and the identities hold (m = 1 reproduces, m = 0 equals masking the key, batched = single rows)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    PaliGemmaConfig,
    Qwen2VLConfig,
    Qwen2VLTextConfig,
    SiglipVisionConfig,
)

from atman.manipulation import enable, manipulate

IMAGE, START, END = 5, 6, 7
TOKENS = 16  # image tokens per image in every config below
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32)


def _pixels(*shape):
    return lambda: {"pixel_values": torch.randn(*shape, generator=torch.Generator().manual_seed(0))}


FAMILIES = {
    "llava": (lambda: LlavaConfig(vision_config=CLIPVisionConfig(**VISION, patch_size=8),
                                  text_config=LlamaConfig(**TEXT), image_token_index=IMAGE,
                                  image_seq_length=TOKENS, vision_feature_layer=-1),
              _pixels(1, 3, 32, 32)),
    "paligemma": (lambda: PaliGemmaConfig(vision_config=SiglipVisionConfig(**VISION, patch_size=8),
                                          text_config=GemmaConfig(**TEXT), image_token_index=IMAGE,
                                          projection_dim=32),
                  _pixels(1, 3, 32, 32)),
    "gemma3": (lambda: Gemma3Config(vision_config=SiglipVisionConfig(**VISION, patch_size=4),
                                    text_config=Gemma3TextConfig(**TEXT), image_token_index=IMAGE,
                                    mm_tokens_per_image=TOKENS, boi_token_index=START, eoi_token_index=END),
               _pixels(1, 3, 32, 32)),
    "idefics3": (lambda: Idefics3Config(vision_config=Idefics3VisionConfig(**VISION, patch_size=4),
                                        text_config=LlamaConfig(**TEXT), image_token_id=IMAGE, scale_factor=2),
                 _pixels(1, 1, 3, 32, 32)),
    "qwen2_vl": (lambda: Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3),
        text_config=Qwen2VLTextConfig(**TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                               "rope_theta": 10000.0}),
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END),
        lambda: {**_pixels(64, 3 * 2 * 4 * 4)(), "image_grid_thw": torch.tensor([[1, 8, 8]])}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_language_model_only_and_identities(family):
    make_config, make_pixels = FAMILIES[family]
    config = make_config()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, START] + [IMAGE] * TOKENS + [END, 10, 11, 12, 13, 14]])
    inputs = {"input_ids": ids, **make_pixels()}
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == IMAGE).long()
    if family == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    # image positions are found from the config's image token, as VisionLanguageExplainer does
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert int((ids == image_id).sum()) == TOKENS
    length = ids.shape[1]
    with torch.no_grad():
        plain = model(**inputs).logits
        enable(model, implementation={"text_config": "atman", "vision_config": "sdpa"})
        rows = torch.ones(3, length)
        rows[1, length - 3] = 0.0
        rows[2, 2:2 + TOKENS // 2] = 0.3
        batch = {k: torch.cat([v] * 3) for k, v in inputs.items()}
        with manipulate(rows) as state:
            out = model(**batch, use_cache=False).logits
        assert state.calls == config.text_config.num_hidden_layers  # the vision tower is left alone
        torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-5)
        with manipulate(rows[2:]):
            single = model(**inputs).logits
        torch.testing.assert_close(out[2], single[0], atol=1e-5, rtol=1e-5)
        assert (out[2] - plain[0]).abs().max() > 1e-4
        if family != "qwen2_vl":  # Qwen2-VL derives its M-RoPE positions from the attention mask
            mask = torch.ones_like(ids)
            mask[0, length - 3] = 0
            masked = model(**inputs, attention_mask=mask).logits
            torch.testing.assert_close(out[1, -2:], masked[0, -2:], atol=1e-5, rtol=1e-5)
