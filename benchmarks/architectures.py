"""Random-init models with the shapes of real ones, for speed and memory measurements.

Cost and memory depend on a model's shapes, not on its weights, so a model built from a config
with random weights costs what the pretrained one costs, with nothing to download. The configs
below copy the published architectures (layer count, widths, heads, key/value heads, head size,
vocabulary, sliding window); position-scaling details that do not change the cost are left out.

    from architectures import random_model
    lm = random_model("llama-8b", tokenizer_dir, device="cuda", dtype="bfloat16")
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig

from atman import enable
from atman.models import DTYPES, LoadedModel, resolve_device


def _llama(**kwargs) -> LlamaConfig:
    return LlamaConfig(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=8192, **kwargs)


ARCHITECTURES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": lambda: _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    # google/gemma-3-270m: 5 sliding-window layers (512) to 1 global, one key/value head
    "gemma3-270m": lambda: Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                            num_hidden_layers=18, num_attention_heads=4,
                                            num_key_value_heads=1, head_dim=256, sliding_window=512,
                                            query_pre_attn_scalar=256, max_position_embeddings=32768),
    # meta-llama/Llama-3.2-1B
    "llama-1b": lambda: _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    # meta-llama/Llama-3.2-3B
    "llama-3b": lambda: _llama(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                               num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                               head_dim=128, tie_word_embeddings=True, rope_theta=500000.0),
    # meta-llama/Llama-3.1-8B
    "llama-8b": lambda: _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, tie_word_embeddings=False, rope_theta=500000.0),
}


def random_model(name: str, tokenizer: str, *, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0) -> LoadedModel:
    """A model with the architecture ``name`` and random weights, made directly on ``device``.

    ``tokenizer`` is a tokenizer directory; its ids must fit the architecture's vocabulary (the
    SmolLM2 tokenizer's 49,152 ids fit every entry above).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    config = ARCHITECTURES[name]()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} ids, more than {name}'s {config.vocab_size}")
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    target = resolve_device(device)
    with target:  # initialise on the device: an 8B model initialised on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.eval()
    enable(model)
    return LoadedModel(model=model, tokenizer=tok, name=f"{name} (random init)")
