"""`AdaptConfig`: one frozen config for every training method; a method is a preset of its loss weights.

Fields left at None take the method's preset value in ``__post_init__``, so the saved config.yaml always
lists the weights a run actually used, and ``--no-em`` / ``--no-self-ensembling`` are plain overrides
(``em_weight=0``, ``consistency_k=0``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wsiuda.config import check_finite, config_from_dict
from wsiuda.errors import ConfigError

METHODS = ("ours", "source-only", "da-adv", "cellseguda", "cbst")

PRESETS: dict[str, dict[str, Any]] = {
    # Li et al. 2021: Dice + entropy + λ(E)·consistency + adversarial + reconstruction.
    "ours": {
        "em_weight": 1.0,
        "consistency_k": 1.0,
        "lambda_adv": 0.001,
        "lambda_recons": 0.01,
        "lr_d": 1e-3,
    },
    # Supervised on the source only (also `wsiuda train`).
    "source-only": {"em_weight": 0.0, "consistency_k": 0.0, "lambda_adv": 0.0, "lambda_recons": 0.0},
    # Output-space adversarial adaptation only (AdaptSegNet's D settings: Adam 1e-4, betas 0.9/0.99).
    "da-adv": {
        "em_weight": 0.0,
        "consistency_k": 0.0,
        "lambda_adv": 0.001,
        "lambda_recons": 0.0,
        "lr_d": 1e-4,
        "d_betas": (0.9, 0.99),
    },
    # Haq & Huang 2020: adversarial + reconstruction.
    "cellseguda": {
        "em_weight": 0.0,
        "consistency_k": 0.0,
        "lambda_adv": 0.001,
        "lambda_recons": 0.01,
        "lr_d": 1e-3,
    },
    # Zou et al. 2018: class-balanced self-training on confident target pseudo-labels.
    "cbst": {
        "em_weight": 0.0,
        "consistency_k": 0.0,
        "lambda_adv": 0.0,
        "lambda_recons": 0.0,
        "cbst_weight": 1.0,
    },
}
PRESET_DEFAULTS: dict[str, Any] = {"lr_d": 1e-3, "d_betas": (0.9, 0.999), "cbst_weight": 0.0}

DEFAULT_WIDTH = 8
"""U-Net base width. One forward and backward pass of a batch of 8 patches of 256² took 0.21 s at width 8,
0.45 s at 16 and 1.5 s at 32 on a 2-core EPYC with AVX-512 (benchmarks/results/train_speed.md); 8 keeps a
run of `ours` (three passes of S per iteration) near a second per iteration. Use 16 or 32 on a GPU."""


@dataclass(frozen=True)
class AdaptConfig:
    """Everything a training run needs. An *epoch* is ``iters_per_epoch`` iterations of ``batch_size``
    random source patches (and as many target patches); with the defaults (60 epochs of 25 iterations) the
    self-ensembling weight peaks at epoch 30, half-way through."""

    source: tuple[Path, ...]
    output: Path
    target: tuple[Path, ...] = ()
    method: str = "ours"
    epochs: int = 60
    iters_per_epoch: int = 25
    batch_size: int = 8
    patch_size: int = 256
    mpp: float = 0.25
    image_mpp: float | None = None
    """µm/px of the images in source, target and target-val image folders (slides carry their own); None: each
    folder's mpp.txt, else 0.25 (as `wsiuda evaluate` reads a folder)."""
    slide_mpp: float | None = None
    """Level-0 µm/px of the target slides, for slides whose metadata lack it (as `wsiuda segment`'s)."""
    held_out: tuple[str, ...] = ("test",)
    """split.tsv rows whose split contains one of these words are never read."""
    val_fraction: float = 0.15
    """Share of each source's slides/patients held out for validation where split.tsv marks no val rows."""
    seed: int = 0
    device: str = "auto"
    budget_minutes: float | None = None
    resume: bool = False
    target_val: Path | None = None
    init: str = "scratch"
    """'scratch', 'default' (the model shipped with wsiuda) or a model.pt path to fine-tune."""
    stain_aug: bool = False
    width: int = DEFAULT_WIDTH
    depth: int = 4
    d_width: int = 32
    r_width: int = 8
    lr_s: float = 1e-4
    lr_r: float = 1e-3
    bce_weight: float = 0.0
    em_on: str = "source"
    """'source' (the paper's Eq. 2), 'target' (as ADVENT) or 'both'."""
    consistency_on: str = "target"
    """'target' (the paper's text: the target goes through S twice), 'source' or 'both'."""
    consistency_peak: float = 30.0
    em_weight: float | None = None
    consistency_k: float | None = None
    lambda_adv: float | None = None
    lambda_recons: float | None = None
    lr_d: float | None = None
    d_betas: tuple[float, ...] | None = None
    cbst_weight: float | None = None
    cbst_start_epoch: int = 5
    """Epochs of source-only training before the first pseudo-labels (0 when fine-tuning a trained model)."""
    cbst_round_epochs: int = 5
    cbst_portion_start: float = 0.2
    cbst_portion_step: float = 0.05
    cbst_portion_max: float = 0.5
    cbst_pool_size: int = 64
    val_every: int = 1
    deterministic: bool = True
    amp: bool = True
    """bfloat16 autocast on a GPU (ignored on a CPU)."""

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        sources = (self.source,) if isinstance(self.source, (str, Path)) else self.source
        # Absolute paths, so that a run resumes from any working directory.
        put("source", tuple(Path(p).absolute() for p in sources))
        targets = (self.target,) if isinstance(self.target, (str, Path)) else self.target
        put("target", tuple(Path(p).absolute() for p in targets))
        put("output", Path(self.output).absolute())
        put("held_out", tuple(self.held_out))
        if self.target_val is not None:
            put("target_val", Path(self.target_val).absolute())
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        preset = PRESET_DEFAULTS | PRESETS[self.method]
        for name, value in preset.items():
            if getattr(self, name) is None:
                put(name, tuple(value) if isinstance(value, tuple) else value)
        if self.d_betas is not None:
            put("d_betas", tuple(float(b) for b in self.d_betas))
        self.validate()

    def validate(self) -> None:
        check_finite(self)
        if not self.source:
            raise ConfigError("no --source given; pass a labelled folder (images/ + masks/)")
        if self.method != "source-only" and not self.target:
            raise ConfigError(f"method {self.method} adapts to a target: pass --target (images or slides)")
        positive_ints = ("epochs", "iters_per_epoch", "batch_size", "width", "depth", "d_width", "r_width")
        for name in (*positive_ints, "val_every", "cbst_round_epochs", "cbst_pool_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.patch_size < 2**self.depth or self.patch_size % 2**self.depth:
            raise ConfigError(
                f"patch size {self.patch_size} must be a multiple of 2**depth = {2**self.depth}"
            )
        if self.mpp <= 0 or (self.image_mpp is not None and self.image_mpp <= 0):
            raise ConfigError(f"mpp must be positive, got {self.mpp} and image mpp {self.image_mpp}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise ConfigError(f"slide-mpp must be positive, got {self.slide_mpp}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ConfigError(f"budget-minutes must be positive, got {self.budget_minutes}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.em_on not in ("source", "target", "both"):
            raise ConfigError(f"em-on must be source, target or both, got {self.em_on!r}")
        if self.consistency_on not in ("source", "target", "both"):
            raise ConfigError(f"consistency-on must be source, target or both, got {self.consistency_on!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("lr_s", "lr_r", "lr_d"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        weights = ("bce_weight", "em_weight", "consistency_k", "lambda_adv", "lambda_recons", "cbst_weight")
        for name in weights:
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.cbst_portion_start <= self.cbst_portion_max <= 1:
            raise ConfigError("cbst portions must satisfy 0 < start <= max <= 1")
        if self.init not in ("scratch", "default") and not Path(self.init).is_file():
            raise ConfigError(f"--init {self.init}: no such model file (use scratch, default or a model.pt)")

    @property
    def uses_target(self) -> bool:
        return bool(self.target) and self.method != "source-only"

    @property
    def uses_discriminator(self) -> bool:
        return float(self.lambda_adv or 0) > 0

    @property
    def uses_reconstructor(self) -> bool:
        return float(self.lambda_recons or 0) > 0

    @property
    def uses_pseudo_labels(self) -> bool:
        return float(self.cbst_weight or 0) > 0

    def replace(self, **changes: Any) -> AdaptConfig:
        return dataclasses.replace(self, **changes)


BROKEN_RUN_FIX = "restore it from a copy, or start a new run with -o NEW_FOLDER"


def load_run_config(run: Path) -> AdaptConfig:
    """The config a run was started with, from RUN/config.yaml."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run} is not a training run (no config.yaml); pass the -o folder of `wsiuda adapt`"
        )
    saved = _saved_config(path)
    try:
        return config_from_dict(AdaptConfig, saved)
    except (TypeError, ValueError) as error:  # unknown or missing fields
        raise ConfigError(f"{path} is unreadable ({one_line(error)}); {BROKEN_RUN_FIX}") from None
    except ConfigError as error:  # a value out of range, or a --source folder since moved
        raise ConfigError(f"{path}: {error}; {BROKEN_RUN_FIX}") from None


def _saved_config(path: Path) -> dict[str, Any]:
    """The ``config:`` mapping of a run's config.yaml."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        # YAML's own message spans several lines, with a caret under the spot: one line, with its number.
        line = "" if error.problem_mark is None else f" at line {error.problem_mark.line + 1}"
        raise ConfigError(f"{path} is not valid YAML ({error.problem}{line}); {BROKEN_RUN_FIX}") from None
    except (yaml.YAMLError, OSError, ValueError) as error:  # ValueError: not UTF-8 text
        raise ConfigError(f"{path} is unreadable ({one_line(error)}); {BROKEN_RUN_FIX}") from None
    saved = document.get("config") if isinstance(document, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds no config: section of a training run; {BROKEN_RUN_FIX}")
    return saved


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
