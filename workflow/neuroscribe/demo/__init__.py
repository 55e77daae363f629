"""The demo world: a procedural probe set with ground truth, its CNN, renderer and captions.

Nothing in the production modules imports it; the config selects its backends by name.
"""
