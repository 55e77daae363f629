"""Tiny random CLIP and Stable Diffusion models saved to local folders, loadable with
`from_pretrained(folder)`.

No hub here: the CLIP tokenizer is a byte-level BPE written locally (vocab.json + merges.txt),
and every model is built from a config with random weights (see
/work/shared/notes/offline-models.md). Built fresh at test time, never committed: the on-disk
format changes between transformers and diffusers versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# words that get whole-word tokens; any other text still encodes byte by byte
WORDS = [
    "one",
    "realistic",
    "image",
    "photo",
    "of",
    "a",
    "the",
    "on",
    "red",
    "blue",
    "green",
    "yellow",
    "striped",
    "dotted",
    "circle",
    "square",
    "star",
    "dog",
    "cat",
    "bird",
    "car",
    "tree",
    "background",
]
IMAGE_SIZE = 32
# the SD pipeline pads prompts to the tokenizer's model_max_length; CLIP's is 77
MAX_LENGTH = 77
HIDDEN = 32


def _bpe_files() -> tuple[dict[str, int], list[str]]:
    """CLIP-style byte-level BPE: every byte alone and as a word end ("</w>"), then the merges
    that spell each word of WORDS, then the special tokens (CLIP's own vocabulary layout)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [f"{c}</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        symbols = [*word[:-1], f"{word[-1]}</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merge = f"{current} {symbol}"
            current += symbol
            if merge not in merges:
                merges.append(merge)
                tokens.append(current)
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and tokenizer_config.json to `folder` and load them back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_files()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH})
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)  # adds tokenizer.json next to the written files
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        # the text tower pools at the first eos, so it must be the tokenizer's real id
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Random CLIP (vision hidden 32, 2 layers, 32 px images, 8 px patches, projection 16) with
    its image processor and tokenizer, saved in `folder`."""
    vision = {
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    return build_clip(folder, _text_config, vision, projection_dim=16, seed=seed)


def build_clip(
    folder: str | Path,
    text_config: Callable[[CLIPTokenizer], dict[str, int]],
    vision_config: dict[str, int],
    projection_dim: int,
    seed: int = 0,
) -> Path:
    """A random CLIP of the given shape with its image processor and the offline tokenizer."""
    folder = Path(folder)
    tokenizer = write_clip_tokenizer(folder)
    size = vision_config["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    config = CLIPConfig(
        text_config=text_config(tokenizer),
        vision_config=vision_config,
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    # saved alone as well as in the processor, so AutoImageProcessor finds it either way
    image_processor.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Random Stable Diffusion pipeline (16 px latents, 32 px images) saved in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # written where save_pretrained puts the tokenizer anyway
    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
    save_sd(folder, unet, vae, text_encoder, tokenizer)
    return folder


def save_sd(
    folder: Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Save the parts as a Stable Diffusion pipeline folder, with SD 1.5's noise schedule."""
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype).save_pretrained(folder)
