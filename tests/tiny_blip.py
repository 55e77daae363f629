"""Tiny random BLIP and BLIP-2 captioners saved to a local folder, loadable with `from_pretrained(folder)`.

No hub here: the config, tokenizer files and processor are all written locally (see
/work/shared/notes/offline-models.md). Built fresh at test time, never committed: the on-disk
format changes between transformers versions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

# BLIP starts decoding from [DEC] (the tokenizer's bos) and stops at [SEP]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "picture",
    "image",
    "dog",
    "cat",
    "bird",
    "car",
    "tree",
    "house",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "small",
    "large",
    "striped",
    "dotted",
    "plain",
    "circle",
    "square",
    "ring",
    "sky",
    "grass",
    "water",
    "road",
    "field",
    "wall",
    "person",
    "people",
    "sitting",
    "standing",
    "next",
    "to",
    "near",
    "background",
]
IMAGE_SIZE = 32


def build_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """Random BLIP (vision hidden 32, 2 layers, 32 px images, 8 px patches) and its processor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL, *WORDS]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(
        str(vocab_file), do_lower_case=True, bos_token="[DEC]", model_max_length=64
    )
    processor = BlipProcessor(
        BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer
    )

    ids = {tok: i for i, tok in enumerate(vocab)}
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": ids["[DEC]"],
        "eos_token_id": ids["[SEP]"],
        "sep_token_id": ids["[SEP]"],
        "pad_token_id": ids["[PAD]"],
        # a wide init makes the logits of a random model far from ties, so greedy captions
        # are stable across batch sizes and differ between images
        "initializer_range": 0.5,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "initializer_range": 0.5,
    }
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_blip2(folder: str | Path, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """Random BLIP-2 (tiny vision encoder, Q-Former and OPT decoder) and its processor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(
        str(vocab_file), bos_token="[CLS]", eos_token="[SEP]", model_max_length=64
    )
    # the processor adds the "<image>" token the query outputs are scattered into
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer,
        num_query_tokens=num_query_tokens,
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = Blip2Config(
        vision_config={
            **small,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "initializer_range": 0.5,
        },
        qformer_config={
            **small,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "vocab_size": len(tokenizer),
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[CLS]"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("[SEP]"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("[PAD]"),
            "init_std": 0.5,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
