"""Training: the loss terms and the one adaptation loop, of which every method is a preset.

With wsiuda.models, the only package that imports torch. The config is importable without torch (the CLI
reads its defaults for --help); ``fit`` loads the loop, and torch, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsiuda.train.config import METHODS, PRESETS, AdaptConfig, load_run_config

if TYPE_CHECKING:
    from wsiuda.train.loop import fit

__all__ = ["METHODS", "PRESETS", "AdaptConfig", "fit", "load_run_config"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from wsiuda.train.loop import fit

        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
