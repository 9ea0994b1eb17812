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


# Tiny configs of every family structured pruning supports: 4 query heads in 2 KV groups (GQA)
# where the family allows it, head_dim 8, MLP width 64, 3 layers.
_FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                     sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                 head_dim=8)),
    "phi3": ("Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                             pad_token_id=1, do_layer_norm_before=True)),
    "gpt2": ("GPT2Config", dict(n_head=4, n_inner=64, n_positions=512, bos_token_id=1, eos_token_id=2)),
}
FAMILIES = tuple(_FAMILY_CONFIGS)


def tiny_family_model(family: str, vocab_size: int = 384, seed: int = 0, **overrides: object):
    """A randomly initialised tiny causal LM of ``family`` (one of :data:`FAMILIES`), eval mode.

    Hidden size 32, 3 layers; ``overrides`` change config fields (``attention_bias=True``...).
    Weights are drawn with std 0.1 (not the families' 0.02) so that every unit matters a little
    and logits differ visibly when one is removed.
    """
    import transformers

    class_name, fields = _FAMILY_CONFIGS[family]
    layers_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    hidden_key = "n_embd" if family == "gpt2" else "hidden_size"
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size, **{hidden_key: 32, layers_key: 3}, max_position_embeddings=512,
        **{"tie_word_embeddings": False, **fields, **overrides},
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
    model.eval()
    return model


def digit_tokenizer() -> "PreTrainedTokenizerFast":
    """The tiny tokenizer, but writing every digit as its own token (as SmolLM2's does): what
    the probe's digits columns need."""
    from tokenizers import pre_tokenizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def digit_model(tok: "PreTrainedTokenizerFast", seed: int = 0) -> "LlamaForCausalLM":
    """A tiny random Llama whose head favours digits and the cell end ' |' (other logits are 0)."""
    model = tiny_llama(vocab_size=max(384, len(tok)), seed=seed)
    keep = [tok.convert_tokens_to_ids(str(d)) for d in range(10)] + [tok(" |")["input_ids"][-1]]
    with torch.no_grad():
        w = model.lm_head.weight  # (V, hidden)
        scaled = w[keep] * 6.0
        w.zero_()
        w[keep] = scaled
    return model
