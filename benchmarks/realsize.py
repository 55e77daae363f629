"""The paper's foundation models with their real architectures and random weights, saved to local
folders that the package loads like hub checkpoints (no download, no account).

A random model costs the same compute per image or token as the trained one, so timings made
with these hold for the real checkpoints: BLIP-large (captioner), Stable Diffusion 1.5 (UNet,
VAE and CLIP text encoder), CLIP ViT-B/16 (similarity). The target, a ResNet-50, needs no folder:
`torchvision:resnet50` with `weights: null`. The tokenizers are the tests' small offline ones
over the real vocabulary sizes, so embedding tables and output layers have their real shapes.
What differs from the trained models: a random captioner never emits its end token, so every
caption runs to `max_new_tokens` (30; trained BLIP stops after about 10-15).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_blip import SPECIAL, WORDS
from tiny_diffusion import build_clip, save_sd, write_clip_tokenizer

BERT_VOCAB = 30524  # BLIP's text decoder (bert-base-uncased plus [DEC] and padding)
CLIP_VOCAB = 49408


def _placeholder(i: int) -> str:
    # a made-up word of letters only ("zab", "zac", ...): captions of a random model then read as
    # many different phrases, as a real captioner's do, and concepts made of them differ too
    word = ""
    while True:
        i, r = divmod(i, 26)
        word += chr(ord("a") + r)
        if not i:
            return f"z{word}"


def _bert_tokenizer(folder: Path) -> BertTokenizer:
    # the real vocabulary size; the words past the tests' list are placeholders
    vocab = [*SPECIAL, *WORDS]
    vocab += [_placeholder(i) for i in range(BERT_VOCAB - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(
        str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]", model_max_length=512
    )


def build_blip_large(folder: str | Path, seed: int = 0) -> Path:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 16,
        },
        text_config={
            "vocab_size": BERT_VOCAB,
            "encoder_hidden_size": 1024,
            "bos_token_id": ids("[DEC]"),
            "eos_token_id": ids("[SEP]"),
            "sep_token_id": ids("[SEP]"),
            "pad_token_id": ids("[PAD]"),
        },
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    image = BlipImageProcessor(size={"height": 384, "width": 384})
    BlipProcessor(image, tokenizer).save_pretrained(folder)
    return folder


def _clip_text(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int) -> dict[str, int]:
    return {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_clip_b16(folder: str | Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch16: ViT-B/16 at 224 px, 512-d projection."""
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
    }
    text = functools.partial(_clip_text, hidden=512, layers=12, heads=8)
    return build_clip(folder, text, vision, projection_dim=512, seed=seed)


def build_sd15(folder: str | Path, seed: int = 0) -> Path:
    """stable-diffusion-v1-5: 860M-parameter UNet on 64x64 latents, KL-f8 VAE, CLIP ViT-L/14
    text encoder, its noise schedule; saved in float16 (half the disk)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x defaults
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text(tokenizer, 768, 12, 12)))
    save_sd(folder, unet, vae, text_encoder, tokenizer, torch.float16)
    return folder
