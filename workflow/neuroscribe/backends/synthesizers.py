"""Concept image synthesis: render images of a concept phrase so a neuron can be tested on them.

Describe-and-Dissect checks a candidate concept by generating images of it (with a text-to-image
model such as Stable Diffusion) and measuring whether the neuron fires on them. Every backend
offers the `Synthesizer` interface: `id` for the image store's keys, `check(concept)` before any
image is drawn, and `draw(requests)`. `DiffusersSynthesizer` is the foundation-model backend; the
offline demo renders the phrase in the demo world (`neuroscribe.demo.renderer`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from neuroscribe.imagestore import Drawer, ImageRequest

# the prompt of the Describe-and-Dissect paper; a text-to-image backend sends it as is
PROMPT_TEMPLATE = "One realistic image of {concept}"


class UnrenderableConcept(ValueError):
    """The synthesizer cannot draw the concept phrase (the demo renderer: it names nothing the
    demo world can draw); the synthesis stage records the concept as unrenderable."""


class Synthesizer(Drawer, Protocol):
    """What every synthesizer backend offers: an `id` for the image store's keys, `check`, and
    `draw` (one image per request, from its prompt and seed)."""

    def check(self, concept: str) -> tuple[str, ...]:
        """The words of `concept` the backend will ignore; raises UnrenderableConcept when it
        cannot draw the concept at all."""
        ...


def image_seed(seed: int, concept: str, index: int) -> int:
    """A stable (unsalted, cross-platform) 63-bit seed for image `index` of a concept."""
    key = f"{seed}\x1f{concept}\x1f{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


class DiffusersSynthesizer:
    """Any diffusers text-to-image pipeline by hub id or local folder (Stable Diffusion 1.5 in
    the paper). Batches of prompts go through one pipeline call, each image with its own seeded
    generator, so an image depends only on (model, settings, prompt, seed), not on its batch.
    """

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        steps: int = 50,
        guidance: float = 7.5,
        size: int = 512,
        scheduler: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        import diffusers

        from neuroscribe.device import resolve_device, resolve_dtype
        from neuroscribe.hub import fetching

        self.model = model
        self.steps = steps
        self.guidance = guidance
        self.size = size
        self.scheduler = scheduler
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(model, "synthesizer"):
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(model, dtype=self.dtype)
        if scheduler:
            cls = getattr(diffusers, scheduler, None)
            # every diffusers model has from_config too: only a scheduler class will do
            if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
                raise ValueError(
                    f"diffusers has no scheduler class {scheduler!r}; use e.g. "
                    "DPMSolverMultistepScheduler or EulerDiscreteScheduler"
                )
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = (
                None  # synthetic probe images; the checker also costs a model pass
            )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"diffusers:{self.model}:steps={self.steps}:guidance={self.guidance}"
            f":size={self.size}:scheduler={self.scheduler or 'default'}:dtype={dtype}"
        )

    def check(self, concept: str) -> tuple[str, ...]:
        return ()  # any phrase is a prompt

    def draw(self, requests: Sequence[ImageRequest]) -> list[Image.Image]:
        import torch

        # generators on CPU: the same seed gives the same starting noise on any device
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[r.prompt for r in requests],
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                height=self.size,
                width=self.size,
                generator=generators,
            )
        return list(out.images)
