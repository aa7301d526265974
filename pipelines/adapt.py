"""`wsiuda adapt` / `wsiuda train`: build or reload the run's config, then train through the one loop.

Training is a single process (one network on one device), so this pipeline has no Dask graph: it only
resolves the run (new or resumed) and hands it to :func:`wsiuda.train.fit`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsiuda.errors import ConfigError
from wsiuda.train import AdaptConfig, fit, load_run_config

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = ("epochs", "budget_minutes", "device")
"""What may change when a run is resumed; anything else would make it a different run."""


def resume_config(run: Path, **changes: Any) -> AdaptConfig:
    """The config of the run in ``run``, marked for resuming, with ``epochs``/``budget_minutes``/``device``
    changed where given (None keeps the saved value)."""
    unknown = set(changes) - set(RESUMABLE_CHANGES)
    if unknown:
        names = ", ".join("--" + name.replace("_", "-") for name in sorted(unknown))
        raise ConfigError(
            f"{names} cannot change when resuming; only --epochs, --budget-minutes and --device can"
        )
    config = load_run_config(run)
    updates = {name: value for name, value in changes.items() if value is not None}
    return config.replace(resume=True, output=Path(run), **updates)


def run_training(config: AdaptConfig, *, progress: bool = True) -> Path:
    """Train and return the run folder (it holds model.pt)."""
    run = fit(config, progress=progress)
    log.info("run folder %s: model.pt holds the weights with the best source validation Dice", run)
    return run
