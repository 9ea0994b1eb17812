"""Tiny random models and tokenizers for tests and examples: no downloads, built in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights; activations remove "
    "neurons. | Name | Gender | Age |\n| Alice | Female | 27 |\n| Bob | Male | 34 |\n"
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\|#*\n"
)


def tiny_tokenizer(vocab_size: int = 320) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer trained on a small built-in corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_llama(
    vocab_size: int = 384,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> "LlamaForCausalLM":
    """A randomly initialised Llama small enough to run a forward pass in a millisecond."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Llama and its tokenizer as an HF folder; return the folder."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=max(384, len(tokenizer)), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
