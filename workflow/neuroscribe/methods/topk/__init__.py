"""`topk`: each neuron's top-K probe images (with attention crops), and no label.

It adds no stage: its rows are the exemplar rows every method starts from.
"""

from __future__ import annotations

from neuroscribe.methods import Method, MethodRows, RowInputs


def rows(inputs: RowInputs) -> MethodRows:
    return MethodRows(inputs.exemplars.assign(method="topk"))


METHOD = Method(name="topk", summary="the top-K exemplars, no label", rows=rows)
