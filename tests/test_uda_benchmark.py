"""benchmarks/uda.py on two tiny labelled domains: runs are cached, each run's CRF is chosen on the
validation split of its training domain, and the report covers the grid."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from PIL import Image
from test_train import nuclei_image

REPO = Path(__file__).resolve().parents[1]

TINY_GRID = {
    "training": {
        "epochs": 1,
        "iters_per_epoch": 2,
        "batch_size": 2,
        "patch_size": 32,
        "width": 4,
        "depth": 2,
        "d_width": 4,
        "r_width": 4,
    },
    "methods": {
        "source-only": {"preset": "source-only", "crf": False, "seeds": 1},
        "ours": {"preset": "ours", "crf": True, "seeds": 1},
        "ours-no-crf": {"preset": "ours", "crf": False, "seeds": 1},
        "oracle": {"preset": "source-only", "train_on": "target", "crf": False, "seeds": 1},
    },
}


@pytest.fixture(scope="module")
def uda() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uda_benchmark", REPO / "benchmarks" / "uda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def write_domain(root: Path, *, seed: int, darken: float) -> Path:
    """Five TNBC-style slides of two images each: split by slide into train (3), val (1) and test (1)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for slide in range(1, 6):
        for index in range(2):
            image, mask = nuclei_image(rng)
            Image.fromarray((image * darken).astype(np.uint8)).save(root / "images" / f"0{slide}_{index}.png")
            Image.fromarray(mask).save(root / "masks" / f"0{slide}_{index}.png")
    return root


def test_runs_are_cached_and_each_crf_is_chosen_on_its_training_domain(
    uda: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_domain(tmp_path / "src", seed=0, darken=1.0)
    target = write_domain(tmp_path / "tgt", seed=1, darken=0.7)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(TINY_GRID))
    arguments = ["--config", str(config), "--source", str(source), "--target", str(target), "--device", "cpu"]
    arguments += ["--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "out"), "-q"]

    scored: list[tuple[str, str, list[str]]] = []  # (domain, role, images) of every scoring call
    real_score_pairs = uda.score_pairs

    def recording(segmenter, pairs, **kwargs):  # type: ignore[no-untyped-def]
        split_folder = pairs[0].image.parent.parent  # cache/splits/DOMAIN-DIGEST/ROLE/images/NAME
        scored.append(
            (split_folder.parent.name.split("-")[0], split_folder.name, sorted(p.name for p in pairs))
        )
        return real_score_pairs(segmenter, pairs, **kwargs)

    monkeypatch.setattr(uda, "score_pairs", recording)
    assert uda.main(arguments) == 0
    report = json.loads((tmp_path / "out" / "uda-src-tgt.json").read_text())
    runs = {run["key"]: run for run in report["runs"]}
    # ours and ours-no-crf share one training and one scoring; three runs in all.
    assert len(runs) == 3
    for run in runs.values():
        choice = run["crf"]
        assert set(choice["validation_dice"]) == set(uda.CRF_CANDIDATES)
        assert choice["chosen"] == max(uda.CRF_CANDIDATES, key=lambda name: choice["validation_dice"][name])
    # Validation images (slide 04) come from the training domain: the source for source-only and ours, the
    # target only for the oracle. Test images (slide 05) come from the target.
    validation = [(domain, names) for domain, role, names in scored if role == "labelled"]
    assert sorted(validation) == [("src", ["04_0", "04_1"])] * 2 + [("tgt", ["04_0", "04_1"])], scored
    assert [(domain, names) for domain, role, names in scored if role == "test"] == [
        ("tgt", ["05_0", "05_1"])
    ] * 3
    markdown = (tmp_path / "out" / "uda-src-tgt.md").read_text()
    assert "CRF (chosen on validation)" in markdown and "Gap closure" in markdown

    # A second invocation finds every run in the cache: nothing is trained or scored again.
    scored.clear()
    trained = sorted((tmp_path / "cache" / "runs").glob("*/training.json"))
    stamps = [path.stat().st_mtime_ns for path in trained]
    assert uda.main(arguments) == 0
    assert scored == []
    assert [path.stat().st_mtime_ns for path in trained] == stamps
