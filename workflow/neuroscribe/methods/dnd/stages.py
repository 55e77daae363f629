"""Describe-and-Dissect stages per chunk of neurons: captions of the exemplars, then concepts.

Each stage reads the previous stage's chunk table, does all of the chunk's work in as few model
calls as it can (captions batched across every exemplar of the chunk, LLM requests concurrent),
and goes through a cache shared by all jobs of the run, so an exemplar or a request seen before
is never paid for again, in this job or after a restart.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from neuroscribe import backends
from neuroscribe.backends.captioners import as_box, exemplar_squash
from neuroscribe.cache import DiskCache
from neuroscribe.config import TargetSpec
from neuroscribe.failures import Failure, check_failures
from neuroscribe.features import Memo, embed_files, layer_activations
from neuroscribe.io import atomic_path
from neuroscribe.methods.dnd.concepts import build_proposer
from neuroscribe.progress import Resumed, finish_chunk
from neuroscribe.redaction import redact, secret_values
from neuroscribe.tables import write_table

log = logging.getLogger(__name__)


def caption_chunk(
    exemplars: str | Path,
    manifest: str | Path,
    out: str | Path,
    captioner: dict[str, Any],
    worlds: Sequence[tuple[str, str]],
    cache: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Caption every exemplar (image or crop) of a chunk, each distinct one once."""
    table = pd.read_parquet(exemplars)
    captions, cached = backends.caption_exemplars(
        table, manifest, captioner, worlds, cache, device, dtype
    )
    s = cached.stats
    log.info(
        "captions: %d exemplars of %d neurons, %d distinct, %d from the cache, %d captioned by %s",
        s.requests,
        table["neuron"].nunique(),
        s.unique,
        s.cache_hits,
        s.captioned,
        cached.id,
    )
    out_table = table[["model", "layer", "neuron", "rank", "image_id", "box"]].copy()
    out_table["caption"] = captions
    out_table["captioner"] = cached.id
    write_table(out_table, out, "captions")


def concept_chunk(
    captions: str | Path,
    out: str | Path,
    llm: dict[str, Any],
    proposal: dict[str, Any],
    cache: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    max_failed_fraction: float = 1.0,
) -> None:
    """N candidate concepts per neuron of a chunk, from its exemplars' captions. `llm` is the
    connection (the config's `llm` section), `proposal` the prompts' settings (`dnd:`'s
    candidates, prompt_mode, ...). Fails, after every usable reply is cached, when more than
    `max_failed_fraction` of the neurons failed."""
    table = pd.read_parquet(captions).sort_values(["neuron", "rank"])
    first = table.iloc[0]
    neurons = [(int(n), list(g["caption"])) for n, g in table.groupby("neuron", sort=True)]
    with DiskCache(cache, "llm") as store:
        proposer = build_proposer(llm | proposal, store, device, dtype)
        records = proposer.propose(neurons)
        client = getattr(proposer, "client", None)
        if client is not None:
            log.info("llm: %s", client.stats.as_dict())
    # replies and errors are stored and logged: no secret may be in them
    secrets = secret_values([llm.get("api_key_env")])
    by_neuron = dict(neurons)
    rows = []
    for r in records:
        row = asdict(r) | {
            "model": first["model"],
            "layer": first["layer"],
            "status": r.status,
            "error": None if r.error is None else redact(r.error, secrets),
            "raw_replies": [redact(text, secrets) for text in r.raw_replies],
            "captions": by_neuron[r.neuron],
            "proposer": proposer.id,
        }
        rows.append(row)
    check_failures(
        f"concepts of {first['model']}/{first['layer']} ({Path(out).stem})",
        [Failure(row["neuron"], row["error"]) for row in rows if row["error"] is not None],
        len(rows),
        max_failed_fraction,
        "The usable replies are cached; the failed neurons' replies are kept in the cache for "
        "audit but asked again on the next run.",
    )
    out_table = pd.DataFrame(rows)
    log.info(
        "concepts: %d neurons (%d failed), %d requests, %d cache hits, %d+%d tokens, by %s",
        len(out_table),
        int((out_table["status"] == "failed").sum()),
        int(out_table["llm_requests"].sum()),
        int(out_table["llm_cache_hits"].sum()),
        int(out_table["prompt_tokens"].sum()),
        int(out_table["completion_tokens"].sum()),
        proposer.id,
    )
    write_table(out_table, out, "concepts")


def synthesize_chunk(
    concepts: str | Path,
    out: str | Path,
    synthesizer: dict[str, Any],
    store: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Q images of every distinct candidate concept of a chunk, drawn once into the run's store."""
    from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE, UnrenderableConcept, image_seed
    from neuroscribe.imagestore import ImageRequest, ImageStore

    table = pd.read_parquet(concepts)
    distinct = list(dict.fromkeys(c for cands in table["candidates"] for c in cands))
    # the synthesizer may have a dtype of its own (the reference draws in float16 and runs the
    # target in float32)
    drawer = backends.synthesizer(synthesizer, device, synthesizer.get("dtype") or dtype)
    q, seed = synthesizer["images_per_concept"], synthesizer["seed"]
    rows, requests, owners = [], [], []
    for concept in distinct:
        prompt = PROMPT_TEMPLATE.format(concept=concept)
        row = {"concept": concept, "prompt": prompt, "synthesizer": drawer.id, "error": None}
        try:
            ignored = drawer.check(concept)
        except UnrenderableConcept as err:
            rows.append(row | {"status": "unrenderable", "error": str(err), "ignored_words": []})
            continue
        seeds = [image_seed(seed, concept, i) for i in range(q)]
        rows.append(row | {"status": "ok", "seeds": seeds, "ignored_words": list(ignored)})
        requests += [ImageRequest(concept, prompt, s) for s in seeds]
        owners += [len(rows) - 1] * q
    paths, drawn = ImageStore(store).ensure(drawer, requests, synthesizer["batch_size"])
    for row in rows:
        row.setdefault("seeds", [])
        row["images"] = []
    for i, path in zip(owners, paths, strict=True):
        rows[i]["images"].append(str(path))
    log.info(
        "synthesis: %d distinct concepts of %d neurons (%d unrenderable), %d images, %d drawn "
        "now, %d from the store, by %s",
        len(distinct),
        len(table),
        sum(r["status"] == "unrenderable" for r in rows),
        len(paths),
        drawn,
        len(paths) - drawn,
        drawer.id,
    )
    columns = ["concept", "prompt", "status", "error", "seeds", "images", "ignored_words"]
    out_table = pd.DataFrame(rows, columns=[*columns, "synthesizer"])
    write_table(out_table, out, "synthesis")


def score_chunk(
    concepts: str | Path,
    synthesis: str | Path,
    exemplars: str | Path,
    manifest: str | Path,
    out: str | Path,
    target: TargetSpec,
    layer: str,
    scoring: dict[str, Any],
    top_k: int,
    settings: dict[str, Any],
    save_every: int = 32,
    max_failed_fraction: float = 1.0,
) -> Resumed:
    """Rank every neuron's candidates by its activations on their images and by image
    similarity to its exemplars; the best 3 become its labels. Neurons are scored `save_every`
    at a time (each image through the models once per job) and kept in a progress record.
    A neuron without images says why; too many of them fail the job."""
    from neuroscribe.activations import load_on
    from neuroscribe.device import resolve_device
    from neuroscribe.methods.dnd.scoring import SCORE_KINDS, best_score, ranked, score_candidates

    concept_table = pd.read_parquet(concepts)
    synth = pd.read_parquet(synthesis).set_index("concept")
    spec = target.layer(layer)
    ex = pd.read_parquet(exemplars).sort_values(["neuron", "rank"])
    probe = pd.read_parquet(manifest, columns=["image_id", "path"]).set_index("image_id")["path"]

    @functools.cache
    def models() -> tuple[Any, Any]:  # loaded once, and only if some part is left to score
        loaded = load_on(target, resolve_device(settings["device"]))
        return loaded, backends.image_similarity(
            scoring["similarity"], loaded, target.transform, settings
        )

    def activations(paths: list[str]) -> np.ndarray:
        return layer_activations(
            paths,
            models()[0],
            spec,
            target.transform,
            settings["batch_size"],
            settings["workers"],
            settings["dtype"],
        )

    acts = Memo(activations)
    synth_emb = Memo(
        lambda paths: embed_files(models()[1], [(p, None) for p in paths]).cpu().numpy()
    )
    # exemplars shared by neurons of the chunk are read and embedded once; a key is
    # (image id, box, squash): the exemplar's pixels as captioned (`exemplar_view`)
    ex_emb = Memo(
        lambda keys: embed_files(models()[1], [(probe[i], b, q) for i, b, q in keys]).cpu().numpy()
    )
    candidates = dict(zip(concept_table["neuron"], concept_table["candidates"], strict=True))
    concept_errors = dict(zip(concept_table["neuron"], concept_table["error"], strict=True))

    def rows_of(part: list[int]) -> pd.DataFrame:
        size = scoring.get("resize")
        images = {
            n: [
                (c, shrunk(p, size))
                for c, c_i in enumerate(candidates[n])
                for p in _images_of(synth, c_i)
            ]
            for n in part
        }
        mine = ex[ex["neuron"].isin(part)]
        ex_keys: dict[int, list[Any]] = {n: [] for n in part}
        squash = exemplar_squash(mine)
        for n, i, b, q in zip(mine["neuron"], mine["image_id"], mine["box"], squash, strict=True):
            ex_keys[int(n)].append((i, as_box(b), q))
        # the part's new images in one batched pass per model; the neurons below read the memo
        every = [p for n in part if images[n] for _, p in images[n]]
        acts.get(every)
        synth_emb.get(every)
        ex_emb.get([k for n in part if images[n] for k in ex_keys[n]])
        rows = []
        for neuron in part:
            cands = list(candidates[neuron])
            row: dict[str, Any] = {"model": target.name, "layer": layer, "neuron": int(neuron)}
            if not images[neuron]:
                why = _why_no_images(cands, concept_errors[neuron], synth)
                rows.append(row | _unscored(cands, why))
                continue
            paths = [p for _, p in images[neuron]]
            owner = np.array([c for c, _ in images[neuron]])
            keys = ex_keys[neuron]
            # mean cosine over exemplar-image pairs = (mean exemplar embedding) . image embedding
            similarity = synth_emb.get(paths) @ ex_emb.get(keys).mean(axis=0)
            scores = score_candidates(
                cands, owner, acts.get(paths)[:, neuron], similarity, scoring["beta"], top_k
            )
            best = ranked(scores, scoring["method"])
            rows.append(
                row
                | {
                    "status": "ok",
                    "error": None,
                    "label": best[0].concept,
                    "labels": [s.concept for s in best[: scoring["labels"]]],
                    "score": best_score(best[0], scoring["method"]),
                    "score_kind": SCORE_KINDS[scoring["method"]],
                    "candidates": cands,
                    "rank_scores": [s.rank_score for s in scores],
                    "similarities": [s.similarity for s in scores],
                    "combined": [s.combined for s in scores],
                    "n_images": [s.n_images for s in scores],
                    "similarity_model": models()[1].id,
                }
            )
        return pd.DataFrame(rows)

    args = {
        "target": target.to_dict(),
        "layer": layer,
        "scoring": scoring,
        "top_k": top_k,
        "device": settings["device"],
        "dtype": settings["dtype"],
    }
    inputs = [concepts, synthesis, exemplars, manifest, *target.weights_files()]
    neurons = [int(n) for n in concept_table["neuron"]]

    def check(table: Any) -> None:
        check_failures(
            f"scores of {target.name}/{layer} ({Path(out).stem})",
            [
                Failure(n, e)
                for n, e in zip(
                    table.column("neuron").to_pylist(),
                    table.column("error").to_pylist(),
                    strict=True,
                )
                if e is not None
            ],
            len(neurons),
            max_failed_fraction,
            "Their candidates have no images (see the errors, the concepts and synthesis tables).",
        )

    resumed = finish_chunk(out, args, inputs, neurons, save_every, rows_of, "scores", check)
    log.info(
        "scores: %d neurons, %d synthesised and %d exemplar images through the models",
        len(neurons),
        len(acts.rows),
        len(ex_emb.rows),
    )
    return resumed


def shrunk(path: str, size: int | None) -> str:
    """A drawn image as it is scored: itself, or with `scoring.resize` a size x size copy (the
    reference scores its generated images at 32 x 32). Made with PIL's default filter, as the
    reference's `image.resize`, saved losslessly beside the original in the store, once."""
    if size is None:
        return path
    small = Path(path).with_name(f"{Path(path).stem}-{size}px.png")
    if not small.exists():
        with Image.open(path) as image, atomic_path(small) as tmp:
            image.convert("RGB").resize((size, size)).save(tmp, format="PNG")
    return str(small)


def _images_of(synth: pd.DataFrame, concept: str) -> list[str]:
    if concept not in synth.index or synth.loc[concept, "status"] != "ok":
        return []
    return list(synth.loc[concept, "images"])


def _why_no_images(cands: list[str], concept_error: str | None, synth: pd.DataFrame) -> str:
    if concept_error is not None:
        return f"no candidate concepts: {concept_error}"
    if not cands:
        return "no candidate concepts were proposed"
    reasons = [
        f"{c!r}: {synth.loc[c, 'error']}"
        for c in cands
        if c in synth.index and synth.loc[c, "error"]
    ]
    return "no candidate could be drawn" + (f" ({'; '.join(reasons)})" if reasons else "")


def _unscored(cands: list[str], error: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": error,
        "label": None,
        "labels": [],
        "score": None,
        "score_kind": None,
        "candidates": cands,
        "rank_scores": [None] * len(cands),
        "similarities": [None] * len(cands),
        "combined": [None] * len(cands),
        "n_images": [0] * len(cands),
        "similarity_model": None,
    }
