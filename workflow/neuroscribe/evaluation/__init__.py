"""Evaluation of every method's labels on held-out probe images (`evaluation:` in the config).

`split` decides which probe images are held out (no method sees them); `metrics` holds the
per-neuron scores and their summaries; `classes` reads a target's class names for its output
layer; `stage` is what the workflow's evaluation jobs run.
"""
