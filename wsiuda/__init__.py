"""wsiuda: whole-slide nucleus segmentation with unsupervised domain adaptation."""

from wsiuda._version import __version__

__all__ = ["__version__"]
