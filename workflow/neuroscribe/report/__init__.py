"""The static HTML report of a run: an index, a page per layer and a page per neuron.

Pages are rendered from Jinja templates with autoescaping on (labels, captions and LLM replies
are untrusted text); images appear as content-addressed thumbnails, never inlined; the layer
pages load their rows from a JavaScript data file and render them in pages, so a layer of
thousands of neurons stays fast. It opens from `file://` or any static file server.
"""
