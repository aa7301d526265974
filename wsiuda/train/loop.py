"""The one adaptation loop: every method runs through :func:`fit`, which only its config changes.

A run folder holds config.yaml, metrics.jsonl (one line per epoch: every loss term's mean, D accuracy, the
self-ensembling weight, epoch time, source and target validation Dice), training_curve.png, last.pt (the
checkpoint to resume from) and model.pt (the weights with the best *source* validation Dice, with the
metadata ``wsiuda segment`` needs). Target validation, when given, is reported and never chooses a model.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsiuda._version import __version__
from wsiuda.config import atomic_write_text, config_to_dict, prepare_output_folder, save_config
from wsiuda.data import (
    LabelledImage,
    LabelledSet,
    TargetPool,
    channel_stats,
    images_mpp,
    open_target,
    read_labelled_folder,
    split_by_group,
)
from wsiuda.errors import ModelError, OutputError, TrainingError
from wsiuda.metrics import dice_iou
from wsiuda.models import (
    ModelMeta,
    Segmenter,
    build_unet,
    default_model_path,
    load_model_file,
    resolve_device,
)
from wsiuda.models.files import CHECKPOINT_FORMAT, atomic_torch_save, safe_load, save_model
from wsiuda.train.batches import BatchSampler, PseudoPool, epoch_rng
from wsiuda.train.config import AdaptConfig
from wsiuda.train.plot import plot_history
from wsiuda.train.pseudo import class_balanced_pseudo_labels, portion_for_round
from wsiuda.train.trainer import NonFiniteLoss, Trainer

log = logging.getLogger(__name__)

CHECKPOINT, MODEL, METRICS, CURVE, SUMMARY = (
    "last.pt",
    "model.pt",
    "metrics.jsonl",
    "training_curve.png",
    "summary.json",
)


def method_label(config: AdaptConfig) -> str:
    label = config.method
    if config.method == "ours" and not float(config.em_weight or 0):
        label += " --no-em"
    if config.method == "ours" and not float(config.consistency_k or 0):
        label += " --no-self-ensembling"
    return label + (" --stain-aug" if config.stain_aug else "")


# -------------------------------------------------------------------------------------------------- data
class RunData:
    """Source train/validation sets, target pools and the optional target validation set, in memory."""

    def __init__(self, config: AdaptConfig) -> None:
        c = config
        self.train: list[LabelledSet] = []
        self.val: list[LabelledImage] = []
        self.val_groups: dict[str, list[str]] = {}
        for folder in c.source:
            dataset = read_labelled_folder(
                folder, image_mpp=images_mpp(folder, c.image_mpp), mpp=c.mpp, held_out=c.held_out
            )
            # Seeded by the dataset's name, so its split does not depend on the other sources or their order.
            split_rng = np.random.default_rng([c.seed, zlib.crc32(dataset.name.encode())])
            train, val = split_by_group(dataset, val_fraction=c.val_fraction, rng=split_rng)
            self.train.append(train)
            self.val += list(val.images)
            self.val_groups[dataset.name] = val.groups
            log.info(
                "source %s: %d training images from %d groups, %d validation images from groups %s",
                dataset.name, len(train.images), len(train.groups), len(val.images),
                ", ".join(val.groups) or "-",
            )  # fmt: skip
        self.targets: list[TargetPool] = []
        if c.uses_target:
            for path in c.target:
                pool = open_target(
                    path,
                    image_mpp=images_mpp(path, c.image_mpp),
                    mpp=c.mpp,
                    size=c.patch_size,
                    held_out=c.held_out,
                    slide_mpp=c.slide_mpp,
                )
                self.targets.append(pool)
                log.info(
                    "target %s: %d %s", pool.name, len(pool), "images" if hasattr(pool, "images") else "tiles"
                )
        self.target_val: list[LabelledImage] = []
        if c.target_val is not None:
            held = read_labelled_folder(
                c.target_val, image_mpp=images_mpp(c.target_val, c.image_mpp), mpp=c.mpp, held_out=()
            )
            self.target_val = list(held.images)

    def training_data(self) -> tuple[dict[str, str], ...]:
        named = [(d.name, d.license) for d in self.train] + [(p.name, p.license) for p in self.targets]
        return tuple({"name": name, "license": license} for name, license in dict(named).items())

    def close(self) -> None:
        for pool in self.targets:
            close = getattr(pool, "close", None)
            if close is not None:
                close()


def mean_dice(segmenter: Segmenter, images: Sequence[LabelledImage]) -> float | None:
    """Mean over images of the pixel Dice at threshold 0.5 (whole images, reflect-padded)."""
    if not images:
        return None
    scores = []
    for item in images:
        probabilities = segmenter.predict(item.image[None], batch_size=1)[0]
        scores.append(dice_iou(probabilities >= 0.5, item.mask)[0])
    return float(np.mean(scores))


def calibration_images(data: RunData, *, count: int = 4, size: int = 512) -> list[np.ndarray]:
    """Images the saved model's int8 ranges are observed on: ``count`` source images (validation images
    where there are some, else training images, spread over the list; centre crops of at most ``size`` px)
    and, since the model is meant for the target, ``count`` fixed random crops of the unlabelled target."""
    images = [item.image for item in data.val] or [item.image for s in data.train for item in s.images]
    chosen = [_centre_crop(image, size) for image in images[:: max(1, len(images) // count)][:count]]
    rng = np.random.default_rng(0)  # the same crops at every save
    for pool in data.targets:
        chosen += list(pool.sample(rng, count=max(1, count // len(data.targets)), size=size))
    return chosen


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    y0, x0 = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
    return image[y0 : y0 + size, x0 : x0 + size]


# ------------------------------------------------------------------------------------------------- setup
def initial_network(config: AdaptConfig) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any]]:
    """S, its normalisation when it comes from a trained model (else None), and its architecture."""
    if config.init == "scratch":
        arch_kwargs = {"width": config.width, "depth": config.depth}
        return build_unet(**arch_kwargs), None, arch_kwargs
    path = default_model_path() if config.init == "default" else Path(config.init)
    if config.init == "default" and not path.is_file():
        raise ModelError("no default model ships with this install; use --init scratch or --init MODEL.pt")
    network, meta = load_model_file(path)
    if (meta.mpp, meta.depth) != (config.mpp, config.depth) or meta.arch_kwargs.get("width") != config.width:
        log.info("fine-tuning %s: its architecture %s and mpp %g are kept", path, meta.arch_kwargs, meta.mpp)
    return network, meta.normalisation, dict(meta.arch_kwargs)


def prepare_output(config: AdaptConfig) -> None:
    out = config.output
    if config.resume:
        if not (out / CHECKPOINT).is_file():
            raise OutputError(f"{out} has no {CHECKPOINT} to resume from; start the run without --resume")
        return
    if (out / CHECKPOINT).exists():
        raise OutputError(
            f"{out} already holds a training run; pass --resume {out} to continue it, or another -o"
        )
    if (out / "config.yaml").exists():
        # A run that stopped before finishing its first epoch has nothing to resume: start it again.
        log.info("%s holds a run that never finished an epoch; starting it again", out)
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out} exists and is not empty; choose a new output folder")
    # It also refuses an -o that is a file, with the fix.
    prepare_output_folder(out)


def kept_epoch(run: Path) -> int | None:
    """The epoch the run's last.pt holds; None where there is none (or none that can be read)."""
    path = Path(run) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return int(safe_load(path, kind="checkpoint")["epoch"])
    except (ModelError, KeyError, TypeError, ValueError):
        return None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`. A KeyboardInterrupt still, so that callers that stop on one do; it names
    the run folder and the epoch its last.pt keeps (None before the first epoch ended), which is what the
    user needs to go on."""

    def __init__(self, run: Path, epoch: int | None) -> None:
        kept = "nothing was kept" if epoch is None else f"epoch {epoch} is kept"
        super().__init__(f"training in {run} interrupted; {kept}")
        self.run, self.epoch = Path(run), epoch


class DeterministicAlgorithms:
    """torch.use_deterministic_algorithms for the run's duration, restored afterwards (it is process-wide)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.previous = torch.are_deterministic_algorithms_enabled()
        if self.enabled:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self.previous)


# -------------------------------------------------------------------------------------------------- loop
def fit(config: AdaptConfig, *, progress: bool = True) -> Path:
    """Train as ``config`` says and return the run folder (it holds model.pt).

    Stops at ``config.epochs`` or, at the end of the iteration that crosses it, at ``budget_minutes`` of
    training (counted from the first iteration of this invocation; the partial epoch is validated and
    checkpointed). A NaN or infinite loss raises :class:`TrainingError` and leaves the last good checkpoint.
    A Ctrl-C raises :class:`TrainingInterrupted`, which says what the run folder keeps.
    """
    try:
        return _fit(config, progress=progress)
    except KeyboardInterrupt as stop:
        # Read from disk, not the loop's counters: the checkpoint is written atomically, so what it holds
        # is what a resume would start from, wherever the interrupt fell. The cause says what stopped it
        # (Ctrl-C, or the CLI's SIGTERM).
        raise TrainingInterrupted(config.output, kept_epoch(config.output)) from stop


def _fit(config: AdaptConfig, *, progress: bool) -> Path:
    prepare_output(config)
    device = resolve_device(config.device)
    deterministic = config.deterministic and device.type == "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with DeterministicAlgorithms(deterministic):
        data = RunData(config)
        try:
            return Run(config, data, device).train(progress=progress)
        finally:
            data.close()


class Run:
    def __init__(self, config: AdaptConfig, data: RunData, device: torch.device) -> None:
        self.config, self.data, self.device = config, data, device
        self.out = config.output
        torch.manual_seed(config.seed)
        network, normalisation, arch_kwargs = initial_network(config)
        if normalisation is None:
            mean, std = channel_stats(data.train)
            normalisation = {"scheme": "meanstd", "mean": mean, "std": std}
        self.meta = ModelMeta(
            arch="unet",
            arch_kwargs=arch_kwargs,
            mpp=config.mpp,
            patch_size=config.patch_size,
            normalisation=normalisation,
            method=method_label(config),
            training_data=data.training_data(),
            config=config_to_dict(config),
        )
        self.trainer = Trainer(config, network, normalisation, device)
        self.sampler = BatchSampler(config, data.train, data.targets)
        self.history: list[dict[str, Any]] = []
        self.best_dice: float | None = None
        self.best_epoch = 0
        self.epoch = 0
        self.pseudo: PseudoPool | None = None
        if config.resume:
            self.load_checkpoint()
        else:
            save_config(config, self.out / "config.yaml", command="adapt")

    # --------------------------------------------------------------------------------------- checkpoints
    def load_checkpoint(self) -> None:
        state = safe_load(self.out / CHECKPOINT, kind="checkpoint")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise OutputError(f"{self.out / CHECKPOINT} is not a wsiuda checkpoint")
        self.trainer.load_state_dict(state["trainer"])
        self.meta = ModelMeta.from_dict(state["meta"], source=str(self.out / CHECKPOINT))
        self.trainer.normalisation = self.meta.normalisation
        self.meta = ModelMeta(**{**self.meta.__dict__, "config": config_to_dict(self.config)})
        self.history = list(state["history"])
        self.best_dice, self.best_epoch, self.epoch = state["best_dice"], state["best_epoch"], state["epoch"]
        pseudo = state.get("pseudo")
        if pseudo is not None:
            self.pseudo = PseudoPool(
                pseudo["images"].numpy(), pseudo["labels"].numpy(), pseudo["round_index"], pseudo["portion"]
            )
        log.info("resuming %s after epoch %d", self.out, self.epoch)

    def save_checkpoint(self) -> None:
        pseudo = None
        if self.pseudo is not None:
            pseudo = {
                "images": torch.from_numpy(self.pseudo.images),
                "labels": torch.from_numpy(self.pseudo.labels),
                "round_index": self.pseudo.round_index,
                "portion": self.pseudo.portion,
            }
        state = {
            "format": CHECKPOINT_FORMAT,
            "wsiuda_version": __version__,
            "epoch": self.epoch,
            "trainer": self.trainer.state_dict(),
            "meta": self.meta.to_dict(),
            "history": self.history,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "pseudo": pseudo,
        }
        atomic_torch_save(state, self.out / CHECKPOINT)

    def write_metrics(self) -> None:
        atomic_write_text(self.out / METRICS, "".join(json.dumps(entry) + "\n" for entry in self.history))
        plot_history(self.history, self.out / CURVE)

    # ------------------------------------------------------------------------------------------ pieces
    def segmenter(self) -> Segmenter:
        """An inference view of S (eval mode; the next training step puts it back in train mode)."""
        return Segmenter(self.trainer.s, self.meta, self.device)

    def refresh_pseudo_labels(self) -> None:
        c = self.config
        if not (self.data.targets and c.uses_pseudo_labels and self.epoch >= c.cbst_start_epoch):
            return
        if (self.epoch - c.cbst_start_epoch) % c.cbst_round_epochs:
            return
        round_index = (self.epoch - c.cbst_start_epoch) // c.cbst_round_epochs
        portion = portion_for_round(
            round_index, start=c.cbst_portion_start, step=c.cbst_portion_step, maximum=c.cbst_portion_max
        )
        from wsiuda.train.batches import sample_targets

        images = sample_targets(
            epoch_rng(c.seed, self.epoch, 1), self.data.targets, count=c.cbst_pool_size, size=c.patch_size
        )
        probabilities = self.segmenter().predict(images, batch_size=c.batch_size)
        labels = class_balanced_pseudo_labels(probabilities, portion=portion)
        self.pseudo = PseudoPool(images, labels, round_index, portion)
        log.info(
            "self-training round %d: pseudo-labels keep %.0f%% of each class", round_index, 100 * portion
        )

    def stop_message(self, error: NonFiniteLoss, iteration: int) -> str:
        kept = (
            f"{self.out / CHECKPOINT} from epoch {self.epoch} is kept"
            if (self.out / CHECKPOINT).exists()
            else "no checkpoint had been written yet"
        )
        return (
            f"loss became non-finite ({error}) at epoch {self.epoch + 1}, iteration {iteration + 1}; "
            f"training stopped and {kept}; lower the learning rates (--lr-s) or check the input data"
        )

    # ------------------------------------------------------------------------------------------- train
    def train(self, *, progress: bool) -> Path:
        c = self.config
        if self.epoch >= c.epochs:
            log.info("%s already trained %d of %d epochs; nothing to do", self.out, self.epoch, c.epochs)
            return self.out
        budget = None if c.budget_minutes is None else 60.0 * c.budget_minutes
        started = time.monotonic()
        stopped = "epochs"
        bar = tqdm(
            total=(c.epochs - self.epoch) * c.iters_per_epoch,
            disable=not progress or not sys.stderr.isatty(),
            file=sys.stderr,
            dynamic_ncols=True,
            desc=method_label(c),
        )
        try:
            while self.epoch < c.epochs:
                self.refresh_pseudo_labels()
                epoch_started = time.monotonic()
                sums: dict[str, float] = defaultdict(float)
                counts: dict[str, int] = defaultdict(int)
                iterations = 0
                batches = self.sampler.epoch(
                    epoch_rng(c.seed, self.epoch), iterations=c.iters_per_epoch, pseudo=self.pseudo
                )
                for iteration, batch in enumerate(batches):
                    try:
                        values = self.trainer.step(batch, epoch=self.epoch + iteration / c.iters_per_epoch)
                    except NonFiniteLoss as error:
                        batches.close()
                        raise TrainingError(self.stop_message(error, iteration)) from None
                    for key, value in values.items():
                        sums[key] += value
                        counts[key] += 1
                    iterations += 1
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "lambda_consistency"})
                    if budget is not None and time.monotonic() - started >= budget:
                        stopped = "budget"
                        batches.close()
                        break
                seconds = time.monotonic() - epoch_started
                self.finish_epoch(
                    {key: sums[key] / counts[key] for key in sums},
                    iterations,
                    seconds,
                    final=stopped == "budget",
                )
                if stopped == "budget":
                    log.info("time budget of %g min reached after epoch %d", c.budget_minutes, self.epoch)
                    break
        finally:
            bar.close()
        summary = {
            "stopped_by": stopped,
            "epochs_done": self.epoch,
            "best_epoch": self.best_epoch,
            "best_source_val_dice": self.best_dice,
            "source_val_groups": self.data.val_groups,
            "training_seconds_this_invocation": round(time.monotonic() - started, 1),
            "model": MODEL,
        }
        atomic_write_text(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return self.out

    def finish_epoch(self, means: dict[str, float], iterations: int, seconds: float, *, final: bool) -> None:
        c = self.config
        self.epoch += 1
        validate = final or self.epoch % c.val_every == 0 or self.epoch == c.epochs
        segmenter = self.segmenter()
        source_dice = mean_dice(segmenter, self.data.val) if validate else None
        target_dice = mean_dice(segmenter, self.data.target_val) if validate else None
        entry: dict[str, Any] = {
            "epoch": self.epoch,
            "iterations": iterations,
            "epoch_seconds": round(seconds, 3),
            "losses": {k: v for k, v in means.items() if k != "lambda_consistency"},
            "lambda_consistency": means.get("lambda_consistency", 0.0),
            "source_val_dice": source_dice,
            "target_val_dice": target_dice,
        }
        # Source validation alone chooses the model; without a validation set the latest weights are kept.
        improved = (not self.data.val) or (
            source_dice is not None and (self.best_dice is None or source_dice > self.best_dice)
        )
        if improved:
            self.best_dice, self.best_epoch = source_dice, self.epoch
            meta = segmenter.calibrated_meta(calibration_images(self.data))
            save_model(self.out / MODEL, self.trainer.s, meta)
        entry["best_epoch"] = self.best_epoch
        self.history.append(entry)
        self.save_checkpoint()
        self.write_metrics()
        log.info(
            "epoch %d: %s, %.1f s, source val Dice %s%s",
            self.epoch,
            ", ".join(f"{k} {v:.4g}" for k, v in entry["losses"].items()),
            seconds,
            "-" if source_dice is None else f"{source_dice:.4f}",
            "" if target_dice is None else f", target val Dice {target_dice:.4f} (not used for selection)",
        )
