"""Compute nodes without internet: a job that cannot get its model says which one and to run
`snakemake prefetch`; `prefetch` downloads every model the config names, here from a fake Hub
on 127.0.0.1 that speaks the real protocol, and the jobs then load them offline."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from fake_hub import FakeHub, Repo, serve
from huggingface_hub import constants
from safetensors.torch import load, save
from tiny_diffusion import build_tiny_clip, build_tiny_sd

from conftest import REPO, run_snakemake, workflow_env
from neuroscribe.config import TargetSpec, targets_from_config, validate_config
from neuroscribe.hub import ModelNotCached, translate
from neuroscribe.models import build_target
from neuroscribe.prefetch import DIFFUSERS, HF, LOCAL, TIMM, TORCHVISION, ModelRef, models_to_fetch

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
MISSING = "neuroscribe-tests/not-in-any-cache"
CLIP_ID = "tiny-org/tiny-clip"
SD_ID = "tiny-org/tiny-sd"
TIMM_NAME = "test_resnet"
TIMM_REPO = "timm/test_resnet.r160_in1k"  # timm.models.get_pretrained_cfg(TIMM_NAME).hf_hub_id


def _dnd_config(**roles: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DEMO)
    cfg.update(roles)
    return cfg


@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME in an empty folder. huggingface_hub reads it when imported, so its constants
    (read by transformers and diffusers at each call) are pointed there too."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


# -- which models a config names --------------------------------------------------------------


def test_prefetch_lists_every_model_the_config_uses_and_only_those(tmp_path: Path) -> None:
    folder = tmp_path / "my-blip"
    folder.mkdir()
    cfg = _dnd_config(
        captioner={"backend": "blip", "model": str(folder)},
        llm={"backend": "local", "model": "Qwen/Qwen2.5-0.5B-Instruct"},
        dnd={
            "synthesizer": {"backend": "diffusers", "model": "stabilityai/sd-turbo"},
            "scoring": {"similarity": {"backend": "clip", "model": "openai/clip-vit-base-patch16"}},
        },
    )
    base = cfg["targets"][0]
    cfg["targets"] = [
        base,  # trained by the workflow: nothing to fetch
        {**base, "name": "tv", "spec": "torchvision:resnet18", "weights": "IMAGENET1K_V1"},
        {**base, "name": "tm", "spec": "timm:resnet18", "weights": "pretrained"},
        {**base, "name": "hub", "spec": "hf:google/vit-base-patch16-224"},
    ]
    for target in cfg["targets"][1:]:
        target.pop("train")
    validate_config(cfg, check_paths=True)
    refs = models_to_fetch(cfg, targets_from_config(cfg))
    assert refs == [
        ModelRef("target tv", "resnet18:IMAGENET1K_V1", TORCHVISION),
        ModelRef("target tm", "resnet18", TIMM),
        ModelRef("target hub", "google/vit-base-patch16-224", HF),
        ModelRef("captioner", str(folder), LOCAL),
        ModelRef("llm", "Qwen/Qwen2.5-0.5B-Instruct", HF),
        ModelRef("synthesizer", "stabilityai/sd-turbo", DIFFUSERS),
        ModelRef("similarity", "openai/clip-vit-base-patch16", HF),
    ]

    # the demo's offline backends and an API llm name no model to download
    demo = validate_config(_dnd_config(llm={"backend": "openai", "model": "gpt-4o-mini"}))
    assert models_to_fetch(demo, targets_from_config(demo)) == []
    # the evaluation's models, each once (its CLIP text space is the simulator's model here)
    scored = _dnd_config(llm={"backend": "none"})
    scored["evaluation"] = {
        "enabled": True,
        "simulator": {"backend": "clip", "model": "google/siglip-base-patch16-224"},
        "text_model": "sentence-transformers/all-mpnet-base-v2",
        "clip_model": "google/siglip-base-patch16-224",
    }
    scored = validate_config(scored)
    assert models_to_fetch(scored, targets_from_config(scored)) == [
        ModelRef("evaluation simulator", "google/siglip-base-patch16-224", HF),
        ModelRef("evaluation text model", "sentence-transformers/all-mpnet-base-v2", HF),
    ]
    # without dnd, the roles are not used at all
    topk = validate_config(
        _dnd_config(methods=["topk"], captioner={"backend": "blip"}, llm={"backend": "local"})
    )
    assert models_to_fetch(topk, targets_from_config(topk)) == []


# -- a job that cannot get its model ----------------------------------------------------------


def _captioner() -> Any:
    from neuroscribe.backends.captioners import BlipCaptioner

    return BlipCaptioner(MISSING, device="cpu")


def _similarity() -> Any:
    from neuroscribe.backends.similarity import ClipSimilarity

    return ClipSimilarity(MISSING, device="cpu")


def _synthesizer() -> Any:
    from neuroscribe.backends.synthesizers import DiffusersSynthesizer

    return DiffusersSynthesizer(MISSING, device="cpu")


def _llm() -> Any:
    from neuroscribe.backends.llm import LocalBackend

    return LocalBackend(MISSING)


def _expected(model: str, role: str, cache: str) -> str:
    return (
        f"model '{model}' ({role}) is not in the local cache ({cache}) and could not be "
        "downloaded from this node: "
    )


PRESCRIPTION = (
    "Compute nodes often have no internet: run `snakemake prefetch --configfile <your config>` "
    "on the login node first (it downloads every model the config names), then run again."
)


@pytest.mark.parametrize(
    ("load", "role"),
    [
        (_captioner, "captioner"),
        (_similarity, "similarity"),
        (_synthesizer, "synthesizer"),
        (_llm, "llm"),
    ],
    ids=["captioner", "similarity", "synthesizer", "llm"],
)
def test_a_model_missing_from_the_cache_names_itself_and_prefetch(
    empty_hf_home: Path, load: Callable[[], Any], role: str
) -> None:
    with pytest.raises(ModelNotCached) as err:
        load()
    message = str(err.value)
    assert message.startswith(_expected(MISSING, role, f"HF_HOME={empty_hf_home}")), message
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in message
    assert message.endswith(PRESCRIPTION)


def test_torchvision_weights_that_cannot_be_downloaded_name_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = validate_config(_dnd_config())
    target = TargetSpec.from_dict(
        targets_from_config(cfg)[0].to_dict()
        | {"spec": "torchvision:resnet18", "weights": "IMAGENET1K_V1", "train": None}
    )
    # the network is blocked in tests, as on a compute node without internet
    with pytest.raises(ModelNotCached) as err:
        build_target(target)
    message = str(err.value)
    expected = _expected(
        "torchvision:resnet18 IMAGENET1K_V1", "target", f"TORCH_HOME={tmp_path / 'torch-home'}"
    )
    assert message.startswith(expected), message
    assert message.endswith(PRESCRIPTION)


def test_other_errors_pass_through(tmp_path: Path, empty_hf_home: Path) -> None:
    from neuroscribe.backends.similarity import ClipSimilarity

    # a local folder without a model: nothing to download, so the loader's own error stands
    with pytest.raises(OSError) as err:
        ClipSimilarity(str(tmp_path), device="cpu")
    assert not isinstance(err.value, ModelNotCached)
    assert translate(ValueError("bad config.json"), MISSING, "captioner") is None
    # a cache folder that cannot be written is not a missing download
    denied = PermissionError(13, "Permission denied", "/shared/torch/hub/checkpoints")
    assert translate(denied, "torchvision:resnet18 IMAGENET1K_V1", "target") is None


# -- prefetch against a fake Hub --------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("hub-repos")
    clip = build_tiny_clip(root / "clip")
    # files for other frameworks are in many real repos; prefetch leaves them on the Hub
    (clip / "tf_model.h5").write_bytes(b"tensorflow weights")
    sd = build_tiny_sd(root / "sd")
    # timm's pretrained weights live in a hub repo named by its pretrained config
    torch.manual_seed(0)
    timm_weights = {"model.safetensors": save(timm.create_model(TIMM_NAME).state_dict())}
    repos = {
        CLIP_ID: Repo.from_folder(clip),
        SD_ID: Repo.from_folder(sd),
        TIMM_REPO: Repo(timm_weights),
    }
    with serve(repos) as running:
        yield running


def _online_env(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    env = workflow_env()
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(offline)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(hf_home),
        TORCH_HOME=str(hf_home.parent / "torch-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def _prefetch(refs: list[ModelRef], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = json.dumps({"refs": [r.to_dict() for r in refs]})
    return subprocess.run(
        [sys.executable, "-m", "neuroscribe", "prefetch", args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_prefetch_downloads_from_the_hub_then_jobs_load_offline(
    hub: FakeHub, tmp_path: Path, empty_hf_home: Path
) -> None:
    from neuroscribe.backends.similarity import ClipSimilarity
    from neuroscribe.backends.synthesizers import DiffusersSynthesizer

    hub.requests.clear()
    refs = [
        ModelRef("similarity", CLIP_ID, HF),
        ModelRef("synthesizer", SD_ID, DIFFUSERS),
        ModelRef("target tm", TIMM_NAME, TIMM),
        ModelRef("captioner", str(tmp_path), LOCAL),
    ]
    env = _online_env(hub, empty_hf_home)
    first = _prefetch(refs, env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"Hugging Face cache: {empty_hf_home / 'hub'}")
    assert lines[1].split()[:3] == ["downloaded", "similarity", CLIP_ID]
    assert lines[2].split()[:3] == ["downloaded", "synthesizer", SD_ID]
    assert lines[3].split()[:4] == ["downloaded", "target", "tm", TIMM_NAME]
    assert lines[4].split() == ["skipped", "(local", "folder)", "captioner", str(tmp_path)]
    assert lines[5] == "4 of 4 models ready"
    downloaded = hub.file_requests("GET")
    assert any(p.endswith("/model.safetensors") for p in downloaded)
    assert any(p.endswith("/unet/diffusion_pytorch_model.safetensors") for p in downloaded)
    assert not any(p.endswith("tf_model.h5") for p in downloaded)

    # offline (as on a compute node), from the cache alone, through the production classes
    assert constants.is_offline_mode()
    similarity = ClipSimilarity(CLIP_ID, device="cpu")
    assert similarity.model.config.projection_dim == 16
    synthesizer = DiffusersSynthesizer(SD_ID, steps=2, size=32, device="cpu")
    assert synthesizer.pipe.unet.config.sample_size == 16
    cfg = validate_config(_dnd_config())
    target = TargetSpec.from_dict(
        targets_from_config(cfg)[0].to_dict()
        | {"spec": f"timm:{TIMM_NAME}", "weights": "pretrained", "train": None}
    )
    served = hub.repos[TIMM_REPO].files["model.safetensors"]
    loaded = build_target(target).module.state_dict()
    assert torch.equal(loaded["fc.weight"], load(served)["fc.weight"])

    # a second prefetch finds everything cached and downloads no file again
    hub.requests.clear()
    second = _prefetch(refs[:3], env)
    assert second.returncode == 0, second.stderr
    assert [line.split()[:2] for line in second.stdout.splitlines()[1:4]] == [
        ["already", "cached"]
    ] * 3
    assert hub.file_requests("GET") == []


def test_prefetch_reports_each_model_it_could_not_get(hub: FakeHub, empty_hf_home: Path) -> None:
    refs = [ModelRef("llm", "nobody/no-such-model", HF), ModelRef("similarity", CLIP_ID, HF)]
    proc = _prefetch(refs, _online_env(hub, empty_hf_home))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["failed", "llm", "nobody/no-such-model"]
    assert "RepositoryNotFoundError" in lines[1]
    assert lines[2].split()[:3] == ["downloaded", "similarity", CLIP_ID]
    assert lines[3] == "1 of 2 models ready, 1 failed"
    assert "PrefetchError: could not download 'nobody/no-such-model'" in proc.stderr


@pytest.mark.slow
def test_snakemake_prefetch_downloads_the_configured_models(
    hub: FakeHub, tmp_path: Path, empty_hf_home: Path
) -> None:
    scoring = {"similarity": {"backend": "clip", "model": CLIP_ID}}
    cfg = _dnd_config(dnd=DEMO["dnd"] | {"scoring": scoring})  # the demo's own synthesizer
    config = tmp_path / "config.yaml"
    cfg["report"] = {"enabled": False}  # tested in test_report.py and test_workflow.py
    config.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, config, "prefetch", env=_online_env(hub, empty_hf_home))
    assert f"downloaded               similarity           {CLIP_ID}" in proc.stdout
    assert "1 of 1 models ready" in proc.stdout
    assert (tmp_path / "results" / "demo" / "logs" / "prefetch.log").exists()
    assert (empty_hf_home / "hub" / "models--tiny-org--tiny-clip" / "snapshots").is_dir()


def test_torch_hub_weights_download_into_torch_home_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's and timm's URL weights: torch.hub's download, its sha256 prefix checked."""
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from neuroscribe.prefetch import _download_url

    served = tmp_path / "served"
    served.mkdir()
    data = b"pretend these are weights"
    name = f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # as torchvision names its files
    (served / name).write_bytes(data)
    (served / "tiny-00000000.pth").write_bytes(data)  # a prefix that does not match
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _download_url(f"{url}/{name}") == len(data)
        assert (tmp_path / "torch-home" / "hub" / "checkpoints" / name).read_bytes() == data
        assert _download_url(f"{url}/{name}") == 0  # already cached
        with pytest.raises(RuntimeError, match="invalid hash value"):
            _download_url(f"{url}/tiny-00000000.pth")
    finally:
        server.shutdown()
        server.server_close()
