"""neuroscribe: plain-language descriptions of the neurons of vision models."""

__version__ = "0.1.0"
