"""Networks, model files and the Segmenter."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_full_disk, open_on_full_disk

from wsiuda.errors import ConfigError, ModelError
from wsiuda.models import (
    FORMAT_VERSION,
    ModelMeta,
    Segmenter,
    build_discriminator,
    build_unet,
    load_model_file,
    save_model,
    unet_receptive_field,
)
from wsiuda.models.unet import fold_batchnorm

torch.set_num_threads(1)


def tiny_meta(**kwargs: object) -> ModelMeta:
    return ModelMeta(arch_kwargs={"width": 4, "depth": 2}, **kwargs)  # type: ignore[arg-type]


def test_unet_returns_one_logit_map_of_the_input_size() -> None:
    net = build_unet(width=4, depth=3)
    out = net(torch.zeros(2, 3, 64, 48))
    assert out.shape == (2, 1, 64, 48)


def test_receptive_field_bounds_the_measured_gradient_support() -> None:
    torch.manual_seed(0)
    net = build_unet(width=2, depth=2).eval()
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    net(x)[0, 0, 48, 48].backward()
    assert x.grad is not None
    rows = np.nonzero(x.grad.abs().sum(dim=(0, 1)).sum(dim=1).numpy())[0]
    extent = rows.max() - rows.min() + 1
    field = unet_receptive_field(depth=2)
    assert field == 44
    assert field // 2 < extent <= field
    assert tiny_meta().receptive_field_px == 44


def test_folding_batchnorm_keeps_the_output_and_leaves_the_network_alone() -> None:
    torch.manual_seed(0)
    net = build_unet(width=4, depth=2)
    net.train()
    for _ in range(3):  # running statistics and affine weights away from their initial 0/1
        net(torch.randn(2, 3, 32, 32) * 3 + 1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 2.0)
            torch.nn.init.uniform_(module.bias, -1.0, 1.0)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # Five double convolutions at depth 2 (two down, the bottleneck, two up), two BatchNorms each.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 10
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        expected, got = net(x), folded(x)
    # The BatchNorms moved into the convolutions: the weights changed, the function did not.
    assert not torch.allclose(folded.down[0][0].weight, net.down[0][0].weight)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_discriminator_scores_patches_of_the_probability_map() -> None:
    out = build_discriminator(width=4)(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 2, 2)


def test_predict_returns_probabilities_for_any_size_and_is_the_network_where_none_is_padded() -> None:
    import copy

    from wsiuda.models.normalise import images_to_tensor

    torch.manual_seed(0)
    network = build_unet(width=4, depth=2)
    original = copy.deepcopy(network).eval()
    segmenter = Segmenter.from_network(network, tiny_meta())
    images = np.random.default_rng(0).integers(0, 256, (3, 37, 50, 3), dtype=np.uint8)
    probabilities = segmenter.predict(images, batch_size=2)
    assert probabilities.shape == (3, 37, 50) and probabilities.dtype == np.float32
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    # A size that needs no padding is the network's own output, and the batch size does not matter.
    square = images[:, :32, :32]
    with torch.no_grad():
        x = images_to_tensor(torch.from_numpy(np.ascontiguousarray(square)), tiny_meta().normalisation)
        direct = torch.sigmoid(original(x))[:, 0].numpy()
    np.testing.assert_allclose(segmenter.predict(square), direct, atol=1e-4)
    single = np.concatenate([segmenter.predict(square[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(segmenter.predict(square), single, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        segmenter.predict(images.astype(np.float32))


# ------------------------------------------------------------------------------------------------ int8
def calibrated(network: torch.nn.Module, meta: ModelMeta) -> ModelMeta:
    images = list(np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    return Segmenter.from_network(network, meta).calibrated_meta(images)


def test_int8_follows_float32_and_auto_takes_it_only_with_a_calibration() -> None:
    torch.manual_seed(2)
    network, meta = build_unet(width=4, depth=2), tiny_meta()
    assert Segmenter.from_network(network, meta, precision="auto").precision == "float32"
    with pytest.raises(ModelError, match="no int8 calibration"):
        Segmenter.from_network(network, meta, precision="int8")
    with pytest.raises(ConfigError, match="unknown precision"):
        Segmenter.from_network(network, meta, precision="int4")

    meta = calibrated(network, meta)
    assert meta.activation_ranges and all(low <= high for low, high in meta.activation_ranges.values())
    exact = Segmenter.from_network(network, meta, precision="float32")
    fast = Segmenter.from_network(network, meta, precision="auto")
    assert fast.precision == "int8"
    images = np.random.default_rng(6).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    difference = np.abs(fast.predict(images) - exact.predict(images))
    assert 0 < difference.mean() < 0.02  # integer arithmetic: close, not equal


def test_int8_calibration_travels_in_the_model_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    network = build_unet(width=4, depth=2)
    meta = calibrated(network, tiny_meta())
    save_model(tmp_path / "model.pt", network, meta)
    loaded = Segmenter.load(tmp_path / "model.pt", device="cpu", precision="auto")
    assert loaded.precision == "int8" and loaded.meta == meta
    images = np.random.default_rng(7).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    in_memory = Segmenter.from_network(network, meta, precision="int8")
    np.testing.assert_array_equal(loaded.predict(images), in_memory.predict(images))


def test_int8_built_in_place_equals_one_built_from_a_copy() -> None:
    from wsiuda.models.quantize import quantize

    torch.manual_seed(4)
    network = build_unet(width=4, depth=2).eval()
    meta = calibrated(network, tiny_meta())
    folded = fold_batchnorm(network)
    before = {name: value.clone() for name, value in folded.state_dict().items()}
    from_copy = quantize(folded, meta.activation_ranges)
    after = folded.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    in_place = quantize(fold_batchnorm(network), meta.activation_ranges, in_place=True)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(in_place(x), from_copy(x), rtol=0, atol=0)


@pytest.mark.parametrize("band_rows", [1, 5, 1000])
def test_int8_float_layers_run_in_row_bands_give_the_same_numbers(band_rows: int) -> None:
    from wsiuda.models.quantize import quantize
    from wsiuda.models.row_bands import RowBands

    torch.manual_seed(6)
    network = build_unet(width=4, depth=2).eval()
    ranges = calibrated(network, tiny_meta()).activation_ranges
    whole = quantize(fold_batchnorm(network), ranges, band_rows=None)
    banded = quantize(fold_batchnorm(network), ranges, band_rows=band_rows)
    bands = [module for module in banded.modules() if isinstance(module, RowBands)]
    assert len(bands) == 3  # two transposed convolutions and the head
    seen_rows: list[int] = []
    for band in bands:
        band.layer.register_forward_hook(lambda _, inputs, __: seen_rows.append(inputs[0].shape[2]))
    # 44 rows: 22 and 11 at the lower levels, so the last band of 5 is a short one.
    x = torch.rand(2, 3, 44, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = whole(x), banded(x)
    assert not got.is_quantized and got.shape == (2, 1, 44, 28)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert seen_rows and max(seen_rows) == min(band_rows, 44)
    assert not any(isinstance(module, RowBands) for module in whole.modules())


def test_an_int8_segmenter_keeps_its_float_network_as_loaded() -> None:
    """The int8 network is built in place from the segmenter's folded copy; the network it keeps, which
    model files are saved from, must come through untouched."""
    torch.manual_seed(5)
    network = build_unet(width=4, depth=2)
    meta = calibrated(network, tiny_meta())
    before = {name: value.clone() for name, value in network.state_dict().items()}
    segmenter = Segmenter.from_network(network, meta, precision="int8")
    after = segmenter.network.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.network.modules())


def test_model_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_unet(width=4, depth=2)
    meta = tiny_meta(method="ours", training_data=({"name": "tnbc", "license": "CC BY 4.0"},))
    save_model(tmp_path / "model.pt", net, meta)
    loaded = Segmenter.load(tmp_path / "model.pt", device="cpu")
    assert loaded.meta == meta
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict(images), Segmenter.from_network(net, meta).predict(images))
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


class DiskFillsUpAfter4KiB:
    """A stand-in for ``open`` whose file takes 4 KiB and then fails with ENOSPC, as a small disk does."""

    def __init__(self, name: str, mode: str) -> None:
        self.file = open(name, mode, buffering=0)  # noqa: SIM115 -- closed by __exit__
        self.room = 4096

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.file.write(view[: self.room])
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(view)
        return int(self.file.write(view) or 0)

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)

    def __enter__(self) -> DiskFillsUpAfter4KiB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@pytest.mark.parametrize(
    "disk",
    [
        pytest.param(open_on_full_disk, id="full from the start", marks=needs_full_disk),
        pytest.param(DiskFillsUpAfter4KiB, id="fills up part-way"),
    ],
)
def test_a_full_disk_while_saving_is_an_output_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: object
) -> None:
    import wsiuda.models.files as files
    from wsiuda.errors import OutputError

    path = tmp_path / "model.pt"
    path.write_bytes(b"the previous model")
    monkeypatch.setattr(files, "open", disk, raising=False)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"):
        save_model(path, build_unet(width=8, depth=2), tiny_meta())
    assert path.read_bytes() == b"the previous model"
    assert list(tmp_path.iterdir()) == [path]


class Payload:
    """Unpickling this runs os.system, which would write a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_model_file_carrying_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    net = build_unet(width=4, depth=2)
    document = {"format": "wsiuda-model", "meta": tiny_meta().to_dict(), "state_dict": net.state_dict()}
    document["meta"]["config"] = {"x": Payload(marker)}
    torch.save(document, path)
    with pytest.raises(ModelError, match="refused"):
        Segmenter.load(path, device="cpu")
    assert not marker.exists(), "loading the model file ran its payload"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelError, match="not a readable"):
        load_model_file(plain)
    assert not marker.exists()


def test_payload_really_runs_under_an_unsafe_loader(tmp_path: Path) -> None:
    """Guards the test above: the same bytes do run code when loaded without weights_only."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_incompatible_files_give_one_line_errors(tmp_path: Path) -> None:
    net = build_unet(width=4, depth=2)
    future = tiny_meta().to_dict() | {"format_version": FORMAT_VERSION + 1}
    torch.save(
        {"format": "wsiuda-model", "meta": future, "state_dict": net.state_dict()}, tmp_path / "new.pt"
    )
    unknown = tiny_meta().to_dict() | {"arch": "transformer"}
    torch.save(
        {"format": "wsiuda-model", "meta": unknown, "state_dict": net.state_dict()}, tmp_path / "arch.pt"
    )
    wrong = tiny_meta().to_dict() | {"arch_kwargs": {"width": 8, "depth": 2}}
    torch.save(
        {"format": "wsiuda-model", "meta": wrong, "state_dict": net.state_dict()}, tmp_path / "wrong.pt"
    )
    (tmp_path / "text.pt").write_text("not a model")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as archive:  # a zip, but no torch archive
        archive.writestr("a.txt", "hello")
    torch.save(net.state_dict(), tmp_path / "bare.pt")  # a plain state_dict, as other tools save them
    (tmp_path / "folder.pt").mkdir()
    fix = "pass a model.pt written by `wsiuda adapt` or `wsiuda train`"
    cases = {
        "new.pt": ("format version", "upgrade wsiuda"),
        "arch.pt": ("arch.pt has malformed metadata: unknown architecture", fix),
        "wrong.pt": ("do not fit", "size mismatch", fix),
        "text.pt": ("not a readable", fix),
        "zip.pt": ("not a readable model file (file in archive is not in a subdirectory", fix),
        "bare.pt": ("is not a wsiuda model file", fix),
        "folder.pt": ("is a folder", fix),
        "missing.pt": ("does not exist", fix),
    }
    for name, parts in cases.items():
        with pytest.raises(ModelError) as info:
            Segmenter.load(tmp_path / name, device="cpu")
        message = str(info.value)
        assert "\n" not in message and "enforce fail" not in message, message
        assert str(tmp_path / name) in message and all(part in message for part in parts), message


def test_default_model_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wsiuda.models.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "default_model_path", lambda: tmp_path / "default.pt")
    with pytest.raises(ModelError, match="no default model ships"):
        Segmenter.load_default(device="cpu")
