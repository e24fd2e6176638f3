"""Tiny randomly initialised Llama models built in the tests (no download, milliseconds to make).

``make_tiny_llama`` gives a model small enough to enumerate every continuation when the
vocabulary is a handful of tokens; ``logit_scale`` sharpens it so that p^alpha and
token-level temperature sampling differ visibly.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(
    vocab_size: int = 6,
    eos_token_id: int = 0,
    seed: int = 0,
    hidden_size: int = 16,
    num_layers: int = 2,
    logit_scale: float = 1.5,
    max_position_embeddings: int = 64,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random init gives near-uniform next-token distributions; scale the head so the
        # model has preferences (and so power and temperature sampling differ).
        model.lm_head.weight.mul_(logit_scale / max(model.lm_head.weight.std().item(), 1e-6) / hidden_size**0.5)
    model.eval()
    return model


def save_tiny_checkpoint(out_dir: str, tokenizer_dir: str, seed: int = 0, hidden_size: int = 16) -> str:
    """A tiny random Llama with a real tokenizer (and chat template) saved as a Hugging Face
    checkpoint directory: a server started on it with ``--model`` loads in about a second."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        hidden_size=hidden_size,
        max_position_embeddings=2048,
        logit_scale=3.0,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
