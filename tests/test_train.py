"""The adaptation loop: every preset trains, gradients go where they should, runs resume exactly."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsiuda.cli.main import cli
from wsiuda.errors import ConfigError, OutputError, TrainingError
from wsiuda.models import Segmenter
from wsiuda.models.files import safe_load
from wsiuda.train import AdaptConfig, fit, load_run_config
from wsiuda.train.batches import BatchSampler, epoch_rng
from wsiuda.train.loop import RunData
from wsiuda.train.trainer import Trainer

torch.set_num_threads(1)


def nuclei_image(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pink with dark disks, and the disks' mask: something a tiny U-Net can start to learn."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (230, 170, 200)
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(5):
        cy, cx, r = (*rng.integers(0, size, 2).tolist(), int(rng.integers(3, 8)))
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disk] = (80, 50, 130)
        mask[disk] = 255
    noise = rng.integers(-8, 9, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    for name, count, labelled in (("source", 6, True), ("target", 4, False), ("target_val", 2, True)):
        (root / name / "images").mkdir(parents=True)
        if labelled:
            (root / name / "masks").mkdir()
        for i in range(count):
            image, mask = nuclei_image(rng)
            if name == "target":
                image = (image * 0.8).astype(np.uint8)  # a darker "lab"
            stem = f"{i // 2 + 1:02d}_{i}"
            Image.fromarray(image).save(root / name / "images" / f"{stem}.png")
            if labelled:
                Image.fromarray(mask).save(root / name / "masks" / f"{stem}.png")
    return {name: root / name for name in ("source", "target", "target_val")}


def tiny(folders: dict[str, Path], output: Path, method: str = "ours", **changes: Any) -> AdaptConfig:
    settings: dict[str, Any] = dict(
        source=(folders["source"],),
        target=(folders["target"],),
        output=output,
        method=method,
        epochs=1,
        iters_per_epoch=2,
        batch_size=2,
        patch_size=32,
        width=4,
        depth=2,
        d_width=4,
        r_width=4,
        device="cpu",
        cbst_start_epoch=0,
        cbst_pool_size=4,
    )
    return AdaptConfig(**(settings | changes))


EXPECTED_TERMS = {
    "ours": {"dice", "em_source", "consistency", "adv", "recons", "d_loss", "d_acc"},
    "source-only": {"dice"},
    "da-adv": {"dice", "adv", "d_loss", "d_acc"},
    "cellseguda": {"dice", "adv", "recons", "d_loss", "d_acc"},
    "cbst": {"dice", "pseudo"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TERMS))
def test_every_preset_trains_and_writes_a_usable_run(
    folders: dict[str, Path], tmp_path: Path, method: str
) -> None:
    run = fit(tiny(folders, tmp_path / "run", method, stain_aug=method == "ours"), progress=False)
    for name in ("config.yaml", "metrics.jsonl", "training_curve.png", "last.pt", "model.pt", "summary.json"):
        assert (run / name).is_file(), name
    (entry,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(entry["losses"]) - {"total"} == EXPECTED_TERMS[method]
    assert entry["iterations"] == 2 and entry["epoch_seconds"] > 0
    assert 0 <= entry["source_val_dice"] <= 1
    segmenter = Segmenter.load(run / "model.pt", device="cpu")
    assert segmenter.meta.method.startswith(method)
    assert segmenter.meta.normalisation["scheme"] == "meanstd"
    assert segmenter.meta.activation_ranges, "model.pt carries no int8 calibration"
    assert {d["name"] for d in segmenter.meta.training_data} >= {"source"}
    assert segmenter.predict(np.zeros((1, 40, 40, 3), dtype=np.uint8)).shape == (1, 40, 40)


def test_ablation_flags_remove_their_terms(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tiny(folders, tmp_path / "run", "ours", em_weight=0.0, consistency_k=0.0)
    run = fit(config, progress=False)
    entry = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert not {"em_source", "consistency"} & set(entry["losses"])
    assert Segmenter.load(run / "model.pt").meta.method == "ours --no-em --no-self-ensembling"


def parameters(module: torch.nn.Module | None) -> list[torch.Tensor]:
    assert module is not None
    return [p.detach().clone() for p in module.parameters()]


def same(before: list[torch.Tensor], module: torch.nn.Module | None) -> bool:
    assert module is not None
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_gradients_go_only_where_they_should(folders: dict[str, Path], tmp_path: Path) -> None:
    from wsiuda.models import build_unet

    config = tiny(folders, tmp_path / "run")
    data = RunData(config)
    trainer = Trainer(config, build_unet(width=4, depth=2), {"scheme": "unit"}, torch.device("cpu"))
    batch = BatchSampler(config, data.train, data.targets).batch(epoch_rng(0, 0), None)
    s, d, r = parameters(trainer.s), parameters(trainer.d), parameters(trainer.r)
    _, source_probabilities, target_probabilities = trainer.segmenter_step(batch, epoch=30.0)
    assert same(d, trainer.d), "the S step moved D"
    assert not same(s, trainer.s) and not same(r, trainer.r)
    assert target_probabilities is not None
    s = parameters(trainer.s)
    trainer.discriminator_step(source_probabilities, target_probabilities)
    assert same(s, trainer.s), "the D step moved S"
    assert not same(d, trainer.d)


def test_resumed_run_matches_an_uninterrupted_one(folders: dict[str, Path], tmp_path: Path) -> None:
    straight = fit(tiny(folders, tmp_path / "straight", epochs=2, seed=3), progress=False)
    stopped = fit(tiny(folders, tmp_path / "stopped", epochs=1, seed=3), progress=False)
    resumed = fit(tiny(folders, stopped, epochs=2, seed=3, resume=True), progress=False)
    a = safe_load(straight / "last.pt", kind="checkpoint")
    b = safe_load(resumed / "last.pt", kind="checkpoint")
    assert a["epoch"] == b["epoch"] == 2
    for net in ("s", "d", "r"):
        for key, value in a["trainer"][net].items():
            assert torch.equal(value, b["trainer"][net][key]), f"{net}.{key} differs after resume"
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_resumed_run_trains_at_its_own_learning_rates(folders: dict[str, Path], tmp_path: Path) -> None:
    stopped = fit(tiny(folders, tmp_path / "run", epochs=1, lr_s=1e-3, lr_d=1e-3, lr_r=1e-3), progress=False)
    resumed = fit(
        tiny(folders, stopped, epochs=2, lr_s=2e-4, lr_d=5e-4, lr_r=3e-4, resume=True), progress=False
    )
    optimizers = safe_load(resumed / "last.pt", kind="checkpoint")["trainer"]
    for name, lr in (("opt_s", 2e-4), ("opt_d", 5e-4), ("opt_r", 3e-4)):
        assert [group["lr"] for group in optimizers[name]["param_groups"]] == [lr], name


def test_cbst_pseudo_labels_survive_a_resume(folders: dict[str, Path], tmp_path: Path) -> None:
    settings = dict(method="cbst", cbst_round_epochs=2, seed=1)
    straight = fit(tiny(folders, tmp_path / "straight", epochs=2, **settings), progress=False)
    stopped = fit(tiny(folders, tmp_path / "stopped", epochs=1, **settings), progress=False)
    resumed = fit(tiny(folders, stopped, epochs=2, resume=True, **settings), progress=False)
    a = safe_load(straight / "last.pt", kind="checkpoint")["trainer"]["s"]
    b = safe_load(resumed / "last.pt", kind="checkpoint")["trainer"]["s"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fit(tiny(folders, tmp_path / "run"), progress=False)
    checkpoint = (run / "last.pt").read_bytes()
    import wsiuda.train.losses as losses

    monkeypatch.setattr(losses, "dice_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match=r"non-finite \(dice=nan.*epoch 2.*last\.pt from epoch 1 is kept"):
        fit(tiny(folders, run, epochs=2, resume=True), progress=False)
    assert (run / "last.pt").read_bytes() == checkpoint
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # A run that fails in its first epoch has nothing to resume; starting it again is allowed.
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):
        fit(tiny(folders, tmp_path / "early"), progress=False)
    monkeypatch.undo()
    assert (fit(tiny(folders, tmp_path / "early"), progress=False) / "model.pt").is_file()


def test_budget_stops_cleanly_after_validating(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tiny(folders, tmp_path / "run", epochs=5, budget_minutes=1e-9, target_val=folders["target_val"])
    run = fit(config, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "budget" and summary["epochs_done"] == 1
    (entry,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert entry["iterations"] == 1
    assert entry["target_val_dice"] is not None and entry["source_val_dice"] is not None
    assert (run / "model.pt").is_file()


def test_model_selection_follows_source_validation_only(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source and target validation disagree on purpose: the model kept is the source's best epoch (2),
    never the target's (4), and the target's Dice is only reported."""
    import wsiuda.train.loop as loop

    # Each validating epoch scores the source, then the target.
    scripted = iter([0.5, 0.9, 0.7, 0.1, 0.6, 0.95, 0.4, 0.99])
    real_mean_dice = loop.mean_dice

    def scripted_mean_dice(segmenter: Segmenter, images: Any) -> float | None:
        real_mean_dice(segmenter, images)
        return next(scripted)

    monkeypatch.setattr(loop, "mean_dice", scripted_mean_dice)
    config = tiny(folders, tmp_path / "run", method="source-only", epochs=4, target_val=folders["target_val"])
    run = fit(config, progress=False)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [entry["source_val_dice"] for entry in history] == [0.5, 0.7, 0.6, 0.4]
    assert [entry["target_val_dice"] for entry in history] == [0.9, 0.1, 0.95, 0.99]
    assert [entry["best_epoch"] for entry in history] == [1, 2, 2, 2]
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == 2
    monkeypatch.undo()
    # model.pt holds the weights of epoch 2: those of a run that stopped there (CPU training is
    # deterministic, and a source-only run's updates do not depend on how many epochs are planned).
    two = tiny(folders, tmp_path / "two", method="source-only", epochs=2, target_val=folders["target_val"])
    after_two = safe_load(fit(two, progress=False) / "last.pt", kind="checkpoint")["trainer"]["s"]
    kept = safe_load(run / "model.pt", kind="model")["state_dict"]
    last = safe_load(run / "last.pt", kind="checkpoint")["trainer"]["s"]
    assert all(torch.equal(kept[key], after_two[key]) for key in kept)
    assert not all(torch.equal(kept[key], last[key]) for key in kept)


def test_a_folders_mpp_txt_sets_its_images_resolution_unless_image_mpp_is_given(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """As `wsiuda evaluate` reads a folder: its 64 px images at 0.5 µm/px are 128 px at the working 0.25."""
    import shutil

    source = tmp_path / "source20x"
    shutil.copytree(folders["source"], source)
    (source / "mpp.txt").write_text("0.5\n")
    from_file = RunData(tiny({**folders, "source": source}, tmp_path / "a"))
    assert {item.image.shape for item in from_file.val} == {(128, 128, 3)}
    given = RunData(tiny({**folders, "source": source}, tmp_path / "b", image_mpp=0.25))
    assert {item.image.shape for item in given.val} == {(64, 64, 3)}


def test_config_and_output_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        tiny(folders, tmp_path / "a", method="magic")
    with pytest.raises(ConfigError, match="pass --target"):
        tiny(folders, tmp_path / "a", target=())
    with pytest.raises(ConfigError, match="multiple of 2\\*\\*depth"):
        tiny(folders, tmp_path / "a", patch_size=30)
    with pytest.raises(ConfigError, match="slide-mpp must be positive"):
        tiny(folders, tmp_path / "a", slide_mpp=0.0)
    with pytest.raises(ConfigError, match="no such model file"):
        tiny(folders, tmp_path / "a", init=str(tmp_path / "missing.pt"))
    assert tiny(folders, tmp_path / "a", method="source-only", target=()).uses_target is False
    run = fit(tiny(folders, tmp_path / "run", method="source-only"), progress=False)
    with pytest.raises(OutputError, match="--resume"):
        fit(tiny(folders, run, method="source-only"), progress=False)
    with pytest.raises(OutputError, match=r"no last\.pt"):
        fit(tiny(folders, tmp_path / "fresh", resume=True), progress=False)


def test_fine_tuning_from_a_model_keeps_its_normalisation(folders: dict[str, Path], tmp_path: Path) -> None:
    first = fit(tiny(folders, tmp_path / "first", method="source-only"), progress=False)
    second = fit(tiny(folders, tmp_path / "second", init=str(first / "model.pt")), progress=False)
    assert (
        Segmenter.load(second / "model.pt").meta.normalisation
        == Segmenter.load(first / "model.pt").meta.normalisation
    )


FAST = ["--iters-per-epoch", "1", "--batch-size", "2", "--patch-size", "32", "--width", "4", "--depth", "2",
        "--device", "cpu", "--no-progress"]  # fmt: skip
"""CLI options of a tiny, quick run (without --epochs)."""


def test_cli_adapt_train_resume_and_bad_input(folders: dict[str, Path], tmp_path: Path) -> None:
    common = ["--epochs", "1", *FAST]
    result = CliRunner().invoke(
        cli,
        ["adapt", "--source", str(folders["source"]), "--target", str(folders["target"]), "-o",
         str(tmp_path / "run"), "--method", "da-adv", "--d-width", "4", "--stain-aug", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").is_file()
    result = CliRunner().invoke(cli, ["adapt", "--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    result = CliRunner().invoke(cli, ["adapt", "--resume", str(tmp_path / "run"), "--width", "8"])
    assert result.exit_code == 2 and "cannot change when resuming" in result.output
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--source",
            str(folders["source"]),
            "-o",
            str(tmp_path / "t"),
            "--bce-weight",
            "1",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert Segmenter.load(tmp_path / "t" / "model.pt").meta.method == "source-only"
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    result = CliRunner().invoke(cli, ["train", "--source", str(empty), "-o", str(tmp_path / "e"), *common])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "no images found" in result.output
    assert len(result.output.strip().splitlines()) == 1


def lines_of(result: Any) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_an_output_that_is_a_file_is_a_one_line_error(folders: dict[str, Path], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command in (["train"], ["adapt", "--target", str(folders["target"])]):
        result = CliRunner().invoke(
            cli,
            ["-q", *command, "--source", str(folders["source"]), "-o", str(a_file), "--epochs", "1", *FAST],
        )
        assert result.exit_code == 2, result.output
        assert lines_of(result) == [f"Error: {a_file} exists and is not a folder; choose another with -o"]


BROKEN_RUN_CONFIGS = {
    "config: [1, 2\n  foo: :\n": "is not valid YAML (expected ',' or ']', but got ':' at line 2)",
    "command: adapt\n": "holds no config: section",
    "config:\n  width: 4\n": "is unreadable (AdaptConfig.__init__() missing 2 required",
    "config: {source: [s], output: o, method: source-only, width: 0}\n": ": width must be at least 1, got 0",
    "config: {source: [s], output: o, colour: blue}\n": "is unreadable (unknown AdaptConfig keys",
}


@pytest.mark.parametrize("text", BROKEN_RUN_CONFIGS)
def test_a_broken_run_config_is_a_one_line_error_naming_it(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    (line,) = lines_of(result)
    assert line.startswith(f"Error: {tmp_path / 'config.yaml'}") and BROKEN_RUN_CONFIGS[text] in line
    assert line.endswith("; restore it from a copy, or start a new run with -o NEW_FOLDER")


def interrupt_after_epoch(
    monkeypatch: pytest.MonkeyPatch, epoch: int, stop: type[KeyboardInterrupt] = KeyboardInterrupt
) -> None:
    """Ctrl-C (or ``stop``) right after the run has finished (and checkpointed) ``epoch``."""
    import wsiuda.train.loop as loop

    finish_epoch = loop.Run.finish_epoch

    def finish_then_interrupt(run: Any, *args: Any, **kwargs: Any) -> None:
        finish_epoch(run, *args, **kwargs)
        if run.epoch == epoch:
            raise stop

    monkeypatch.setattr(loop.Run, "finish_epoch", finish_then_interrupt)


def suggested_command(line: str) -> list[str]:
    """The arguments of the `wsiuda ...` command an interrupt message suggests (without "wsiuda")."""
    quoted = line.split("`")[1]
    assert quoted.startswith("wsiuda ")
    return shlex.split(quoted)[1:]


def epochs_in(run: Path) -> int:
    return len((run / "metrics.jsonl").read_text().splitlines())


def test_ctrl_c_says_what_the_run_keeps_and_how_to_go_on(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiuda.train.loop as loop

    run = tmp_path / "a run"  # a space, which the suggested command must quote
    adapt = ["-q", "adapt", "--source", str(folders["source"]), "--target", str(folders["target"]),
             "--method", "da-adv", "--d-width", "4", "-o", str(run), "--epochs", "2", *FAST]  # fmt: skip

    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "step", interrupt)
        result = CliRunner().invoke(cli, adapt)
    assert result.exit_code == 130
    assert lines_of(result) == [
        "Interrupted before the first epoch ended; nothing was kept: run the same command again"
    ]
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 1)
        result = CliRunner().invoke(cli, adapt)  # the same command again, as the line said
    assert result.exit_code == 130
    assert lines_of(result) == [
        f"Interrupted; epoch 1 is kept: go on with `wsiuda adapt --resume {shlex.quote(str(run))}`"
    ]
    result = CliRunner().invoke(cli, ["-q", *suggested_command(lines_of(result)[0])])
    assert result.exit_code == 0, result.output
    assert epochs_in(run) == 2


def test_a_terminated_resume_suggests_its_own_changes_again(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (a batch scheduler's stop, raised as Terminated by the console script) stops a run as Ctrl-C
    does, and says so; here it stops a resumed run whose --epochs changed."""
    from wsiuda.cli.main import TERMINATED_EXIT_CODE, Terminated

    run = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["-q", "train", "--source", str(folders["source"]), "-o", str(run), "--epochs", "1", *FAST]
    )
    assert result.exit_code == 0, result.output
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 2, Terminated)
        result = CliRunner().invoke(cli, ["-q", "train", "--resume", str(run), "--epochs", "3"])
    assert result.exit_code == TERMINATED_EXIT_CODE
    # --epochs 3 lives in no file: without it, the suggested command would stop at the saved 1 epoch.
    assert lines_of(result) == [
        f"Terminated; epoch 2 is kept: go on with `wsiuda train --resume {run} --epochs 3`"
    ]
    result = CliRunner().invoke(cli, ["-q", *suggested_command(lines_of(result)[0])])
    assert result.exit_code == 0, result.output
    assert epochs_in(run) == 3


def test_adapt_slide_mpp_supplies_the_target_slides_resolution(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from test_data import write_slide_without_mpp

    slide = write_slide_without_mpp(tmp_path / "no-mpp.tif")
    run = tmp_path / "run"
    adapt = ["-q", "adapt", "--source", str(folders["source"]), "--target", str(slide), "--method", "da-adv",
             "--d-width", "4", "-o", str(run), "--epochs", "1", *FAST]  # fmt: skip
    refused = CliRunner().invoke(cli, adapt)
    assert refused.exit_code == 2 and "has no mpp in its metadata; pass --slide-mpp" in refused.output
    result = CliRunner().invoke(cli, [*adapt, "--slide-mpp", "0.5"])
    assert result.exit_code == 0, result.output
    assert load_run_config(run).slide_mpp == 0.5
    changed = CliRunner().invoke(cli, ["-q", "adapt", "--resume", str(run), "--slide-mpp", "0.25"])
    assert changed.exit_code == 2 and "--slide-mpp cannot change when resuming" in changed.output
    # The saved value opens the slide again: a resume needs no --slide-mpp.
    resumed = CliRunner().invoke(cli, ["-q", "adapt", "--resume", str(run), "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert epochs_in(run) == 2


def test_training_curve_of_a_first_epoch_draws_without_warnings(tmp_path: Path) -> None:
    import warnings

    from wsiuda.train.plot import plot_history

    # After the first epoch there is no validation Dice yet: an empty right-hand panel must not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_history([{"epoch": 1, "losses": {"dice": 0.6}}], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
