"""A tiny random chat Llama saved to a local folder, loadable with `from_pretrained(folder)`.

No hub here: a byte-level BPE tokenizer is trained in process on a few sentences, given special
tokens and a Jinja chat template, and saved with a random 2-layer `LlamaForCausalLM` (see
/work/shared/notes/offline-models.md). Built fresh at test time, never committed: the on-disk
format changes between transformers versions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# one turn per message, closed by <|end|> (the eos, so generation stops at the end of a turn)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [
    "a red circle on a white background",
    "a photo of a dog sitting on the grass",
    "a striped cat next to a blue car",
    "propose concepts that describe the neuron as JSON",
    '{"concepts": ["red circle", "dog", "striped texture"]}',
    "the images show yellow birds in a green tree",
    # numbers and tab-separated listings, so "0".."10" are single tokens (the LLM simulator's
    # teacher-forced values need them)
    "rate each item from 0 1 2 3 4 5 6 7 8 9 to 10",
    "1\t0\n2\t10\n3\t5\n4\t10\n5\t7\n6\t10\n7\t2\n8\t10\n9\t1\n10\t10\n",
]


def build_tiny_chat(folder: str | Path, seed: int = 0) -> Path:
    """Random Llama (hidden 32, 2 layers, 2 heads) and its tokenizer, saved in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL[3:],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    ids = {tok: bpe.token_to_id(tok) for tok in SPECIAL}
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|end|>"],
        pad_token_id=ids["<|pad|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
