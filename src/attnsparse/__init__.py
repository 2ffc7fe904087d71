"""attnsparse: measure, condense, evaluate and accelerate sparse attention in Hugging Face causal LMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnsparse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
