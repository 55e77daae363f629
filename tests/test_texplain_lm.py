"""TExplain's translator, its training (kill and resume included) and sentence sampling, on a
tiny word-level GPT-2 pre-trained briefly on the demo world's captions (neuroscribe.demo.lm)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neuroscribe.demo.lm import build_word_lm, pretrain_word_lm, world_captions, world_vocabulary
from neuroscribe.demo.world import COLOURS, SHAPES, scenes
from neuroscribe.methods.texplain import train as train_module
from neuroscribe.methods.texplain.lm import caption_batch, load_lm, prefix_loss
from neuroscribe.methods.texplain.sampling import generate_one_at_a_time, generate_sentences
from neuroscribe.methods.texplain.train import TrainSettings, train_translator
from neuroscribe.methods.texplain.translator import (
    TranslatorSpec,
    build_translator,
    load_translator,
    save_translator,
)

CPU = torch.device("cpu")
OBJECT = r"a (small|medium|large) (red|green|blue|yellow|purple|orange)( striped| dotted| checkered)? (circle|square|triangle|diamond|cross|star|ring)"
CAPTION = re.compile(rf"{OBJECT}( and {OBJECT})? on a (plain|gradient|noisy) background")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Models this small gain nothing from threads, and on a busy 2-core machine spinning
    threads made every step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("word-lm")
    build_word_lm(world_vocabulary(), folder)
    # about 300 steps: the LM learns to copy words from its context (a phase change near step
    # 250), without which no prefix can steer it
    pretrain_word_lm(folder, world_captions(500, seed=0), steps=300, batch_size=32, lr=3e-3, seed=0)
    return folder


@pytest.fixture(scope="module")
def lm(lm_folder: Path) -> tuple:
    return load_lm(str(lm_folder), CPU, torch.float32)


def world_pairs(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Features that carry the main object's shape and colour (one-hot, noisy, among noise
    units), with the scenes' captions."""
    rng = np.random.default_rng(seed)
    drawn = scenes(n, size=64, seed=seed)
    features = rng.normal(0, 0.1, size=(n, len(SHAPES) + len(COLOURS) + 6)).astype(np.float32)
    for i, scene in enumerate(drawn):
        features[i, SHAPES.index(scene.objects[0].shape)] += 1
        features[i, len(SHAPES) + list(COLOURS).index(scene.objects[0].colour)] += 1
    return features, [scene.caption for scene in drawn]


def random_prefixes(lm: tuple, images: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    """Random prefixes [images, k, d] at the scale of the LM's tokens: token embeddings plus noise."""
    model, _ = lm
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(weight), (images, k), generator=generator)
    noise = torch.randn(images, k, weight.shape[1], generator=generator)
    return weight[rows].detach() + 0.5 * weight.std().item() * noise


def test_translator_kinds_shapes_and_round_trip(tmp_path: Path) -> None:
    for kind in ("linear", "mlp"):
        spec = TranslatorSpec(kind, in_features=12, embed_dim=8, prefix_tokens=3)
        assert TranslatorSpec.from_dict(spec.to_dict()) == spec
        translator = build_translator(spec)
        translator.set_standardisation(torch.randn(50, 12) * 5 + 2)
        features = torch.randn(4, 12)
        out = translator(features)
        assert out.shape == (4, 3, 8)
        save_translator(translator, tmp_path / f"{kind}.pt")
        loaded = load_translator(tmp_path / f"{kind}.pt", CPU)
        assert loaded.spec == spec
        assert torch.equal(loaded(features), translator.eval()(features))
        for name, value in translator.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value)
    assert TranslatorSpec("mlp", 12, 8, 3).hidden == 12  # ClipCap's k*d/2
    assert TranslatorSpec("linear", 12, 8, 3, hidden=99).hidden is None
    constant = build_translator(TranslatorSpec("linear", 2, 4, 1))
    constant.set_standardisation(torch.tensor([[1.0, 3.0], [1.0, 5.0]]))
    assert constant.feature_std[0] == pytest.approx(1e-6)  # a dead unit divides by the floor
    with pytest.raises(ValueError, match="kind"):
        TranslatorSpec("transformer", 12, 8)


def test_caption_batch_and_prefix_loss(lm: tuple) -> None:
    model, tokenizer = lm
    ids, mask = caption_batch(tokenizer, ["a red star", "a large blue ring on a noisy"], 5)
    eos = tokenizer.eos_token_id
    assert ids.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert ids[0, 3] == eos and ids[1, 4] == eos  # eos kept when a caption is cut
    # the loss is the LM's own causal-LM loss with the prefix positions and padding ignored
    prefixes = random_prefixes(lm, 2, k=3)
    ours = prefix_loss(model, prefixes, ids, mask)
    labels = torch.cat([torch.full((2, 3), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    inputs = torch.cat([prefixes, model.get_input_embeddings()(ids)], dim=1)
    attention = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    theirs = model(inputs_embeds=inputs, attention_mask=attention, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    total = prefix_loss(model, prefixes, ids, mask, reduction="sum")
    assert total.item() == pytest.approx(ours.item() * int(mask.sum()), rel=1e-5)


def test_load_lm_names_the_model(tmp_path: Path) -> None:
    (tmp_path / "not-an-lm").mkdir()
    with pytest.raises(RuntimeError, match="not-an-lm"):
        load_lm(str(tmp_path / "not-an-lm"), CPU, torch.float32)


def test_training_lowers_validation_loss(lm_folder: Path, lm: tuple, tmp_path: Path) -> None:
    features, captions = world_pairs(240, seed=1)
    # 280 steps at 1e-2: 16 steps at 3e-2 left the prefix ~0.01 short of the unprompted LM on
    # another machine's arithmetic; this margin is ~0.08 on both
    settings = TrainSettings(
        lr=1e-2,
        warmup_steps=5,
        batch_size=32,
        max_epochs=40,
        eval_every=7,
        patience=20,
        checkpoint_every=1000,
        seed=0,
    )
    metrics = train_translator(
        features,
        captions,
        str(lm_folder),
        settings=settings,
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
        kind="linear",
        prefix_tokens=4,
        device="cpu",
    )
    # the LM alone (from bos, as pre-trained) on the same validation captions: the prefix must
    # tell it more than "a caption starts here", i.e. the main object's shape and colour
    model, tokenizer = lm
    _, val = train_module.split_indices(len(captions), settings.val_fraction, settings.seed)
    ids, mask = caption_batch(tokenizer, [captions[i] for i in val], 40)
    bos = model.get_input_embeddings().weight[tokenizer.eos_token_id]
    with torch.no_grad():
        unprompted = prefix_loss(model, bos.expand(len(val), 1, -1), ids, mask).item()
    assert metrics["best_val_loss"] < metrics["first_val_loss"] - 0.3
    assert metrics["best_val_loss"] < unprompted - 0.05, (metrics, unprompted)
    assert metrics["stop_reason"] == "max_epochs" and metrics["dtype"] == "float32"
    assert metrics["steps"] == 40 * 7 and metrics["resumed_from_step"] is None
    out = tmp_path / "out"
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,split,loss" and lines[1].startswith("0,validation,")
    assert sum(",train," in line for line in lines) == 40 * 7
    translator = load_translator(out / "translator.pt", CPU)
    assert translator.spec.kind == "linear" and translator.spec.embed_dim == 64


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the code under test catches it."""


def test_killed_and_resumed_run_is_bit_identical(
    lm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    features, captions = world_pairs(120, seed=2)
    # 108 training examples in batches of 16: 7 steps per epoch, 14 in all; checkpoints at 4, 8
    # and 12 (step 8 is mid-epoch 1), evaluations every 3 steps; killed during step 10
    settings = TrainSettings(
        lr=3e-3,
        warmup_steps=3,
        batch_size=16,
        max_epochs=2,
        eval_every=3,
        patience=50,
        checkpoint_every=4,
        seed=3,
    )

    def run(name: str) -> dict:
        return train_translator(
            features,
            captions,
            str(lm_folder),
            settings=settings,
            out_dir=tmp_path / name / "out",
            checkpoint_dir=tmp_path / name / "ckpt",
            kind="mlp",
            prefix_tokens=2,
            hidden=32,
            device="cpu",
        )

    whole = run("whole")
    real_step = train_module._train_step
    calls = {"n": 0}

    def dies_during_step_10(*args: object) -> float:
        calls["n"] += 1
        if calls["n"] == 10:
            raise Killed
        return real_step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_train_step", dies_during_step_10)
        with pytest.raises(Killed):
            run("killed")
    assert not (tmp_path / "killed" / "out" / "translator.pt").exists()
    resumed = run("killed")
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == whole["steps"] == 14

    saved = [
        torch.load(tmp_path / name / "out" / "translator.pt", weights_only=True)
        for name in ("whole", "killed")
    ]
    for name, value in saved[0]["state_dict"].items():
        assert torch.equal(saved[1]["state_dict"][name], value), name
    loss_csv = [(tmp_path / n / "out" / "loss.csv").read_text() for n in ("whole", "killed")]
    assert loss_csv[0] == loss_csv[1]
    for key in ("best_val_loss", "final_val_loss", "first_val_loss", "best_step"):
        assert resumed[key] == whole[key]

    # a rerun after the end only rewrites the outputs; other settings ignore the checkpoint
    again = run("whole")
    assert again["resumed_from_step"] == 14 and again["best_val_loss"] == whole["best_val_loss"]
    settings = TrainSettings(**{**settings.to_dict(), "max_epochs": 1})
    assert run("whole")["resumed_from_step"] is None


def test_seeded_sampling_is_reproducible(lm: tuple) -> None:
    model, tokenizer = lm
    prefixes = random_prefixes(lm, 3)
    args = {"sentences": 6, "max_new_tokens": 20, "temperature": 1.0, "top_p": 0.95}
    first = generate_sentences(model, tokenizer, prefixes, [1, 2, 3], **args)
    assert first == generate_sentences(model, tokenizer, prefixes, [1, 2, 3], **args)
    assert len(first) == 3 and all(len(s) == 6 for s in first)
    assert all(len(set(s)) > 1 for s in first)  # samples of one image differ from each other
    other = generate_sentences(model, tokenizer, prefixes, [4, 5, 6], **args)
    assert all(a != b for a, b in zip(first, other, strict=True))
    with pytest.raises(ValueError, match="one seed per image"):
        generate_sentences(model, tokenizer, prefixes, [1], **args)


def test_batched_generation_equals_one_at_a_time(lm: tuple) -> None:
    model, tokenizer = lm
    prefixes = random_prefixes(lm, 5, seed=1)
    seeds = [10, 11, 12, 13, 14]
    greedy = {"sentences": 2, "max_new_tokens": 20, "temperature": 1.0, "top_p": 1.0}
    batched = generate_sentences(
        model, tokenizer, prefixes, seeds, batch_rows=4, greedy=True, **greedy
    )
    assert batched == generate_one_at_a_time(
        model, tokenizer, prefixes, seeds, greedy=True, **greedy
    )
    assert all(a == b for a, b in batched)  # greedy: every sample the same

    sampled = {"sentences": 5, "max_new_tokens": 20, "temperature": 0.9, "top_p": 0.9}
    batched = generate_sentences(model, tokenizer, prefixes, seeds, batch_rows=7, **sampled)
    assert batched == generate_one_at_a_time(model, tokenizer, prefixes, seeds, **sampled)
    # an image's sentences do not depend on its batch's other images, nor on where rows split
    pair = generate_sentences(
        model, tokenizer, prefixes[[3, 0]], [seeds[3], seeds[0]], batch_rows=3, **sampled
    )
    assert pair == [batched[3], batched[0]]


def test_demo_lm_speaks_the_world_language(lm: tuple) -> None:
    model, tokenizer = lm
    vocabulary = set(world_vocabulary())
    bos = model.get_input_embeddings().weight[tokenizer.eos_token_id].detach()
    starts = bos[None, None].expand(2, 1, -1)  # from bos, as it was pre-trained
    args = {"max_new_tokens": 30, "temperature": 1.0, "top_p": 0.9}
    drawn = generate_sentences(model, tokenizer, starts, [0, 1], 16, **args)
    sentences = [s for image in drawn for s in image]
    assert all(set(s.split()) <= vocabulary for s in sentences)
    grammatical = [s for s in sentences if CAPTION.fullmatch(s)]
    assert len(grammatical) >= 28, sentences
    greedy = generate_sentences(model, tokenizer, starts[:1], [0], 1, greedy=True, **args)
    assert CAPTION.fullmatch(greedy[0][0]), greedy


def test_world_vocabulary_covers_the_captions_and_pretraining_is_deterministic(
    tmp_path: Path,
) -> None:
    vocabulary = world_vocabulary()
    assert {w for c in world_captions(1000, seed=3) for w in c.split()} <= set(vocabulary)
    weights = []
    for name in ("one", "two"):
        folder = build_word_lm(vocabulary, tmp_path / name, n_layer=1, n_embd=16, n_head=2)
        pretrain_word_lm(folder, world_captions(50, seed=0), steps=5, batch_size=8, lr=1e-2, seed=4)
        weights.append(load_file(folder / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
