"""One LLM request per neuron that turns its overrepresented words into a short label (with
`llm.backend` none, the label is the top words in order instead)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from neuroscribe.backends.llm import ChatRequest, LLMClient

SYSTEM = (
    "You help name what a neuron of an image classifier responds to. You are given words that "
    "a captioning model used unusually often for the images the neuron responds to, most "
    "distinctive first. Answer with one short noun phrase (1 to 5 words) naming the visual "
    "concept those words point to. Reply with the phrase only."
)
MAX_WORDS = 5


def request(model: str, words: Sequence[str]) -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=(
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Words: " + ", ".join(words)},
        ),
        temperature=0.0,
        max_tokens=16,
    )


def clean(reply: str) -> str:
    """The phrase of a reply: its first line, without quotes, a label prefix or a full stop."""
    line = reply.strip().splitlines()[0] if reply.strip() else ""
    line = re.sub(r"^(label|concept|phrase)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip(" \"'`.*").strip()


def phrase(client: LLMClient, words: Sequence[str]) -> str:
    """The label for `words` (cached like every request); a reply with no usable phrase is
    rejected from the cache and raises, so the next run asks again."""
    asked = request(client.backend.model, words)
    text = clean(client.chat(asked).text)
    if not text or len(text.split()) > 2 * MAX_WORDS:
        reason = f"the reply {text[:80]!r} is not a short phrase"
        client.reject(asked, reason)
        raise ValueError(reason)
    return text
