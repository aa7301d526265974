"""`wsiuda evaluate` and its pipeline on tiny synthetic folders, with a stand-in network that calls dark
pixels nuclei, so that the right answer is known; and on a few real TNBC and MoNuSeg images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import shared_file
from PIL import Image
from torch import nn

from wsiuda.cli.main import cli
from wsiuda.crf import CrfParams
from wsiuda.errors import ConfigError, DataError
from wsiuda.models import ModelMeta, Segmenter, build_unet, save_model
from wsiuda.pipelines.evaluate import (
    EvaluateConfig,
    config_path,
    evaluate,
    format_table,
    labelled_pairs,
    resolve_data_mpp,
    score_pairs,
)

torch.set_num_threads(1)

PINK, PURPLE = (236, 176, 208), (70, 40, 120)


class DarkIsNucleus(nn.Module):
    """Logit = steep function of brightness: dark purple pixels are nuclei. Records input sizes."""

    def __init__(self, brightness: float = 0.6) -> None:
        super().__init__()
        self.brightness = brightness
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((int(x.shape[-2]), int(x.shape[-1])))
        return 40.0 * (self.brightness - x.mean(dim=1, keepdim=True))


def stand_in(*, mpp: float = 0.25, brightness: float = 0.6) -> tuple[Segmenter, DarkIsNucleus]:
    network = DarkIsNucleus(brightness)
    meta = ModelMeta(arch_kwargs={"width": 2, "depth": 2}, mpp=mpp, normalisation={"scheme": "unit"})
    return Segmenter.from_network(network, meta, device="cpu"), network


def write_folder(root: Path) -> Path:
    """Two 64x64 images: one RGBA with a binary 0/255 mask holding two separate nuclei, and one RGB with a
    16-bit instance-label mask holding two touching nuclei (A: 10x12 px, B: 10x6 px)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.full((64, 64, 3), PINK, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    for y, x in ((8, 8), (40, 36)):
        image[y : y + 12, x : x + 12] = PURPLE
        mask[y : y + 12, x : x + 12] = 255
    rgba = np.dstack([image, np.full((64, 64), 255, dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "images" / "a_1.png")
    Image.fromarray(mask).save(root / "masks" / "a_1.png")

    image = np.full((64, 64, 3), PINK, dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.uint16)
    image[10:20, 10:28] = PURPLE
    labels[10:20, 10:22] = 1000
    labels[10:20, 22:28] = 2000
    Image.fromarray(image).save(root / "images" / "b_1.png")
    Image.fromarray(labels).save(root / "masks" / "b_1.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "data")


def test_perfect_pixels_and_instance_labels_used_as_they_are(folder: Path) -> None:
    segmenter, _ = stand_in()
    result = evaluate(EvaluateConfig(data=folder, crf=False), segmenter=segmenter, progress=False)
    a, b = result.rows
    assert (a.name, b.name) == ("a_1", "b_1")
    assert (a.dice, a.iou, a.f1, a.aji, a.pq) == (1.0, 1.0, 1.0, 1.0, 1.0)
    # The prediction merges the two touching nuclei of the label map: A (IoU 120/180) is matched, B is missed.
    assert (b.dice, b.n_true, b.n_pred, b.tp, b.fn) == (1.0, 2, 1, 1, 1)
    assert b.f1 == pytest.approx(2 / 3)
    assert b.aji == pytest.approx(0.5)
    assert result.summary.dice == 1.0
    assert result.summary.f1 == pytest.approx((1 + 2 / 3) / 2)
    assert result.data_mpp == 0.25 and result.model_mpp == 0.25


def test_images_are_resampled_to_the_model_mpp_and_scored_on_the_mask_grid(folder: Path) -> None:
    segmenter, network = stand_in(mpp=0.25)
    (folder / "mpp.txt").write_text("0.5\n")
    assert resolve_data_mpp(folder, None) == 0.5
    assert resolve_data_mpp(folder, 0.3) == 0.3
    result = evaluate(EvaluateConfig(data=folder, crf=False), segmenter=segmenter, progress=False)
    # 64 px at 0.5 µm/px are 128 px at the model's 0.25 (padding to a multiple of 4 leaves 128 as it is).
    assert network.seen == [(128, 128), (128, 128)]
    assert result.data_mpp == 0.5
    assert result.summary.dice > 0.95
    # Scored on the masks' own 64 px grid: as many true pixels as each mask has, not 4x as many.
    for row in result.rows:
        mask = np.asarray(Image.open(folder / "masks" / f"{row.name}.png"))
        assert row.true_pixels == np.count_nonzero(mask)


def test_crf_variant_is_scored_from_the_same_prediction(folder: Path) -> None:
    segmenter, network = stand_in()
    scores = score_pairs(
        segmenter,
        labelled_pairs(folder),
        data_mpp=0.25,
        variants={"network": None, "crf": CrfParams()},
        progress=False,
    )
    assert len(network.seen) == 2  # one forward pass per image for both variants
    assert [r.name for r in scores["crf"]] == ["a_1", "b_1"]
    assert all(r.dice > 0.9 for r in scores["crf"])


def test_split_selects_rows_of_split_tsv(folder: Path) -> None:
    (folder / "split.tsv").write_text("a_1\tTest_Folder\nb_1\tTrain_Folder\n")
    assert [p.name for p in labelled_pairs(folder, split="test")] == ["a_1"]
    with pytest.raises(DataError, match=r"no image of split\.tsv"):
        labelled_pairs(folder, split="val")


def test_bad_inputs_fail_with_one_clear_error(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        EvaluateConfig(data=folder, threshold=1.5)
    with pytest.raises(ConfigError, match="JSON"):
        EvaluateConfig(data=folder, output=tmp_path / "report.txt")
    for bad in (b"forty-x", b"inf", b"nan", b"\xff\xfe\x00"):
        (folder / "mpp.txt").write_bytes(bad)
        with pytest.raises(DataError, match=r"mpp\.txt"):
            resolve_data_mpp(folder, None)
    (folder / "mpp.txt").unlink()
    (folder / "split.tsv").write_bytes(b"garbage\x00\xff\n")
    with pytest.raises(DataError, match=r"split\.tsv is not a text file"):
        evaluate(
            EvaluateConfig(data=folder, crf=False, split="test"), segmenter=stand_in()[0], progress=False
        )
    (folder / "split.tsv").unlink()
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(folder / "masks" / "a_1.png")
    segmenter, _ = stand_in()
    with pytest.raises(DataError, match=r"a_1\.png"):
        evaluate(EvaluateConfig(data=folder, crf=False), segmenter=segmenter, progress=False)


def test_table_lists_every_image_and_the_summary(folder: Path) -> None:
    segmenter, _ = stand_in()
    table = format_table(
        evaluate(EvaluateConfig(data=folder, crf=False), segmenter=segmenter, progress=False)
    )
    for word in ("a_1", "b_1", "mean", "pooled", "AJI", "PQ"):
        assert word in table


def test_cli_writes_report_and_config_beside_it(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    meta = ModelMeta(arch_kwargs={"width": 2, "depth": 2}, mpp=0.25)
    save_model(tmp_path / "model.pt", build_unet(width=2, depth=2), meta)
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "-m",
            str(tmp_path / "model.pt"),
            "--data",
            str(folder),
            "--no-crf",
            "-q",
            "-o",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "a_1" in result.output and "pooled" in result.output
    document = json.loads(report.read_text())
    assert [row["name"] for row in document["images"]] == ["a_1", "b_1"]
    assert document["images"][0]["group"] == "a_1"  # no slide or patient in the name: its own group
    assert set(document["summary"]) >= {"dice", "iou", "pooled_dice", "f1", "aji", "pq"}
    assert document["config"]["crf"] is False
    saved = yaml.safe_load(config_path(report).read_text())
    assert saved["command"] == "evaluate"
    assert saved["config"]["data"] == str(folder)


def test_cli_errors_are_one_line(tmp_path: Path, folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["evaluate", "-m", str(tmp_path / "none.pt"), "--data", str(tmp_path / "nowhere")]
    )
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith("Error:") and "nowhere" in line


def test_cli_without_a_default_model_says_to_pass_one(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiuda.models.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "default_model_path", lambda: tmp_path / "absent" / "default.pt")
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(folder)])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith("Error:") and "no default model" in line and "-m" in line


def link_images(shared: Path, dataset: str, names: list[str], root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        mask = shared_file(shared, f"datasets/{dataset}/masks/{name}.png")
        images = sorted(shared_file(shared, f"datasets/{dataset}/images").glob(f"{name}.*"))
        if not images:
            pytest.skip(f"{name} is absent from {shared / 'datasets' / dataset / 'images'}")
        (root / "images" / images[0].name).symlink_to(images[0])
        (root / "masks" / mask.name).symlink_to(mask)
    return root


@pytest.mark.realdata
def test_real_tnbc_and_monuseg_images_are_read_and_scored(shared: Path, tmp_path: Path) -> None:
    # TNBC: RGBA PNGs with 0/255 masks; a dark-pixel stand-in finds some of the nuclei, with the CRF.
    tnbc = link_images(shared, "tnbc", ["10_1", "11_1"], tmp_path / "tnbc")
    segmenter, _ = stand_in(brightness=0.7)
    result = evaluate(EvaluateConfig(data=tnbc, crf=True), segmenter=segmenter, progress=False)
    assert [row.name for row in result.rows] == ["10_1", "11_1"]
    assert all(row.n_true > 5 for row in result.rows)
    assert 0.3 < result.summary.dice < 1.0
    # MoNuSeg's official test images are RGB TIFFs with PNG masks, 1000x1000.
    monuseg = link_images(shared, "monuseg2018", ["TCGA-2Z-A9J9-01A-01-TS1"], tmp_path / "monuseg")
    segmenter, _ = stand_in(brightness=0.4)
    result = evaluate(EvaluateConfig(data=monuseg, crf=False), segmenter=segmenter, progress=False)
    (row,) = result.rows
    assert row.true_pixels > 50_000 and row.n_true > 100
    assert 0.3 < row.dice < 1.0
