"""The model that ships in wsiuda/weights: it loads safely and finds nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import NUCLEUS, synthetic_he

from wsiuda.models import Segmenter, default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().is_file(), reason="no default model in this install")


def test_default_model_loads_with_its_metadata() -> None:
    segmenter = Segmenter.load_default(device="cpu")
    assert segmenter.meta.mpp == 0.25
    assert segmenter.meta.receptive_field_px > 0
    assert {item["name"] for item in segmenter.meta.training_data}, "the model file names its training data"


def test_default_model_scores_nuclei_above_background() -> None:
    image = synthetic_he((256, 256), seed=3)
    nuclei = np.all(np.abs(image.astype(int) - NUCLEUS).max(axis=-1, keepdims=True) < 40, axis=-1)
    probability = Segmenter.load_default(device="cpu").predict(image[None])[0]
    assert probability.shape == image.shape[:2]
    assert probability[nuclei].mean() > probability[~nuclei].mean() + 0.3


def test_default_model_runs_in_int8_on_a_cpu_like_in_float32() -> None:
    image = synthetic_he((256, 256), seed=4)
    fast = Segmenter.load_default(device="cpu", precision="auto")
    assert fast.precision == "int8"
    exact = Segmenter.load_default(device="cpu", precision="float32").predict(image[None])[0] >= 0.5
    agree = (fast.predict(image[None])[0] >= 0.5) == exact
    assert exact.any() and agree.mean() > 0.99


def test_default_model_in_int8_gives_the_same_numbers_with_its_float_layers_in_row_bands() -> None:
    import torch

    from wsiuda.models.quantize import quantize
    from wsiuda.models.row_bands import RowBands
    from wsiuda.models.unet import fold_batchnorm

    segmenter = Segmenter.load_default(device="cpu", precision="float32")
    ranges = segmenter.meta.activation_ranges
    banded = quantize(fold_batchnorm(segmenter.network), ranges)
    whole = quantize(fold_batchnorm(segmenter.network), ranges, band_rows=None)
    assert sum(isinstance(module, RowBands) for module in banded.modules()) == 5  # 4 upsamplings, the head
    # 208 rows: the head and the top two upsamplings take 208, 104 and 52 rows, in bands of 32 ending short.
    x = torch.randn(1, 3, 208, 272).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(banded(x), whole(x), rtol=0, atol=0)
