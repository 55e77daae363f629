"""Offline backends of the captioner and LLM roles against their interfaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuroscribe.backends.captioners import CaptionRequest
from neuroscribe.demo.annotations import AnnotationCaptioner, MissingAnnotation
from neuroscribe.demo.world import BACKGROUND_WORDS, WorldObject, render_world
from neuroscribe.probe import image_id
from neuroscribe.words import FrequencySummariser


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AnnotationCaptioner]:
    root = tmp_path_factory.mktemp("world")
    table = render_world(root, n_images=40, size=64, seed=2)
    return table, AnnotationCaptioner.from_world([("w", root)])


def test_whole_image_caption_is_the_annotation(world) -> None:
    table, captioner = world
    rows = table.iloc[:5]
    requests = [CaptionRequest(image_id("w", r), f"/x/{r}") for r in rows["relpath"]]
    assert captioner.caption(requests) == list(rows["caption"])


def test_crop_caption_names_the_objects_inside_the_box(world) -> None:
    table, captioner = world
    two = table[[len(o) == 2 for o in table["objects"]]].iloc[0]
    main, second = two["objects"]
    iid = image_id("w", two["relpath"])
    # a crop around each object names only that object
    phrase = WorldObject(**{**main, "box": tuple(main["box"])}).phrase()
    assert captioner.caption([CaptionRequest(iid, "p", tuple(main["box"]))]) == [f"a {phrase}"]
    crop_second = captioner.caption([CaptionRequest(iid, "p", tuple(second["box"]))])[0]
    assert second["shape"] in crop_second and second["colour"] in crop_second
    assert main["shape"] not in crop_second.replace(second["shape"], "")
    # the whole image box names both; an empty corner names the background
    both = captioner.caption([CaptionRequest(iid, "p", (0, 0, 64, 64))])[0]
    assert " and " in both
    corner = captioner.caption([CaptionRequest(iid, "p", (0, 0, 1, 1))])[0]
    assert corner == f"{BACKGROUND_WORDS[two['background']]} background"


def test_missing_annotation_is_a_clear_error(world) -> None:
    _, captioner = world
    with pytest.raises(MissingAnnotation, match=r"image nope \(/img.png\) has no annotation"):
        captioner.caption([CaptionRequest("nope", "/img.png")])


def test_frequency_summariser_proposes_the_shared_words() -> None:
    captions = [
        "a large red striped circle on a plain background",
        "a medium red circle on a noisy background",
        "a large red dotted circle and a small blue square on a gradient background",
        "a medium red ring on a plain background",
    ]
    summariser = FrequencySummariser()
    concepts = summariser.propose(captions, 5)
    assert concepts[:2] == ["red", "circle"]
    assert len(concepts) == 5 and len(set(concepts)) == 5
    assert all(c == c.lower() and 1 <= len(c.split()) <= 5 for c in concepts)
    assert all(w not in {"a", "on", "background"} for c in concepts for w in c.split())
    assert summariser.propose(captions, 5) == concepts  # deterministic
    assert summariser.phrase_counts(captions)["red circle"] == 1
    assert summariser.word_counts(captions).most_common(1) == [("red", 4)]
    assert summariser.propose([], 3) == []
