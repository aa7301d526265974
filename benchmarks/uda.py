"""Cross-domain benchmark: train every method on a labelled source and unlabelled target, score on the target.

    .venv/bin/python benchmarks/uda.py                      # the whole grid of benchmarks/uda_config.yaml
    .venv/bin/python benchmarks/uda.py --pairs monuseg:tnbc --methods source-only,ours --max-seeds 1 \\
        --budget-minutes 1                                  # a reduced grid
    .venv/bin/python benchmarks/uda.py --report-only        # tables from the runs already cached
    .venv/bin/python benchmarks/uda.py --source DIR --target DIR   # any other labelled pair

Each run (pair, method, seed, training settings) is trained with ``wsiuda.train.fit`` on the source's training
split, adapting to the target's training images without their masks; its model is chosen on the source's
validation split only (fit keeps the weights of best source validation Dice). The model is then scored on the
target's test split, with and without the dense CRF; the CRF's parameters are chosen per run out of
CRF_CANDIDATES on the same validation split. A finished run is cached under ``benchmarks/cache/runs/``
keyed by a hash of everything that determines its training, with its scores on each test split beside it
(the oracle of one pair and the source-only model of the reverse pair are one training run), so the grid can
be completed over several sittings; an interrupted run is started again. After every run the report
(``benchmarks/results/uda.md`` and ``.json``) is rewritten from the cache, covering the whole grid at the
current settings, with runs not yet done marked. The budget and every ``--set`` value are part of a run's
identity: invocations that fill one grid must pass the same ones.

Splits of a ``--source``/``--target`` folder: its split.tsv rows naming train/val/test, else by group (slide
or patient from the file name, sorted): the last fifth of the groups is the test split, the fifth before it
the validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsiuda.config import atomic_write_text
from wsiuda.crf import CrfParams
from wsiuda.data import find_pairs, folder_mpp, group_id, read_split_table
from wsiuda.errors import ConfigError, WsiudaError
from wsiuda.metrics import mean_std
from wsiuda.pipelines.evaluate import labelled_pairs, score_pairs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import cpu_model  # noqa: E402

log = logging.getLogger("uda")
CACHE_VERSION = 1

# The dense CRFs a run's CRF rows may use: the paper's (its group's parameters, full resolution) and the same
# kernels at half resolution with lighter appearance weights. Each run takes the one of best per-image Dice
# on the validation split of the domain it was trained on (never on target labels, the oracle's own domain
# aside), as `wsiuda segment`'s default CRF was chosen (results/crf_tuning.md).
CRF_CANDIDATES: dict[str, CrfParams] = {
    "paper (w1=10, full resolution)": CrfParams(),
    "w1=10, half resolution": CrfParams(downsample=2),
    "w1=3, half resolution": CrfParams(w1=3.0, downsample=2),
    "w1=1, half resolution": CrfParams(w1=1.0, downsample=2),
}
ROLES = ("train", "val", "test")
VARIANTS = ("network", "crf")
METRICS = ("iou", "dice", "f1", "aji", "pq", "pooled_dice")

# Li et al. 2021, Table 1 (KIRC, TCIA and TNBC data; other data than ours): (IoU, Dice) per column.
PAPER_COLUMNS = ("TNBC → KIRC", "TNBC → TCIA", "TCIA → KIRC", "TCIA → TNBC")
PAPER_TABLE1: dict[str, tuple[tuple[float, float], ...]] = {
    "da-adv": ((0.3276, 0.4911), (0.4480, 0.6082), (0.2914, 0.4484), (0.4078, 0.5712)),
    "cbst": ((0.3031, 0.4627), (0.4015, 0.5638), (0.2853, 0.4413), (0.3901, 0.5547)),
    "cellseguda": ((0.5487, 0.7039), (0.5802, 0.7188), (0.5539, 0.7067), (0.4109, 0.6078)),
    "ours-no-crf": ((0.551, 0.7023), (0.5689, 0.7233), (0.5566, 0.718), (0.4023, 0.6051)),
    "ours-no-em": ((0.5523, 0.7025), (0.5661, 0.7211), (0.5665, 0.7251), (0.4271, 0.6295)),
    "ours-no-self-ensembling": ((0.5607, 0.7189), (0.5791, 0.7301), (0.5653, 0.7233), (0.4308, 0.6246)),
    "ours": ((0.5683, 0.7234), (0.6049, 0.7413), (0.5737, 0.7261), (0.5263, 0.6796)),
}


# ------------------------------------------------------------------------------------------------ domains
@dataclass(frozen=True)
class Domain:
    """A labelled dataset and its fixed train/val/test split (image names per role)."""

    key: str
    title: str
    root: Path
    mpp: float
    splits: dict[str, tuple[str, ...]]
    split_rule: str
    location: str
    """Where the data are, as cache keys see it: relative to the shared folder, so that how --shared is
    spelled does not change a run's identity; absolute for a --source/--target folder."""

    def describe(self) -> str:
        counts = ", ".join(f"{role} {len(self.splits[role])}" for role in ROLES)
        return f"{self.title} ({self.location}): {self.split_rule}; images: {counts}"


def _names_by_role(root: Path, assign: dict[str, str | None]) -> dict[str, tuple[str, ...]]:
    splits: dict[str, list[str]] = {role: [] for role in ROLES}
    for name, role in assign.items():
        if role is not None:
            splits[role].append(name)
    for role in ROLES:
        if not splits[role]:
            raise ConfigError(f"{root}: the split leaves no {role} images")
    return {role: tuple(sorted(names)) for role, names in splits.items()}


def domain_from_spec(key: str, spec: dict[str, Any], shared: Path) -> Domain:
    root = Path(spec["path"])
    root = root if root.is_absolute() else shared / root
    names = [image.stem for image, _ in find_pairs(root)]
    rule = spec["split"]
    if rule["by"] == "group":
        role_of = {group: role for role in ROLES for group in rule[role]}
        assign = {name: role_of.get(group_id(name)) for name in names}
        described = "split by slide: " + "; ".join(f"{role} {', '.join(rule[role])}" for role in ROLES)
    elif rule["by"] == "split.tsv":
        table = read_split_table(root)
        role_of = {rule[role]: role for role in ROLES}
        assign = {name: role_of.get(table.get(name, "")) for name in names}
        described = "split.tsv: " + "; ".join(f"{role} = {rule[role]}" for role in ROLES)
    else:
        raise ConfigError(f"domain {key}: unknown split rule {rule['by']!r} (group or split.tsv)")
    splits = _names_by_role(root, assign)
    given = Path(spec["path"])
    location = str(root) if given.is_absolute() else f"shared/{given.as_posix()}"
    return Domain(
        key, spec.get("title", key), root, float(spec.get("mpp", 0.25)), splits, described, location
    )


def domain_from_folder(path: Path) -> Domain:
    """A ``--source``/``--target`` folder: split.tsv's train/val/test rows, else by group (last fifths)."""
    root = path.resolve()
    names = [image.stem for image, _ in find_pairs(root)]
    table = read_split_table(root)
    if table:
        assign = {}
        for name in names:
            split = table.get(name, "").lower()
            assign[name] = next((role for role in ROLES if role in split), None)
        rule = "split.tsv rows naming train / val / test"
    else:
        groups = sorted({group_id(name) for name in names})
        if len(groups) < 3:
            raise ConfigError(
                f"{root}: {len(groups)} slide/patient groups cannot make train, val and test splits; add a "
                "split.tsv (name<TAB>train|val|test per line)"
            )
        fifth = max(1, len(groups) // 5)
        role_of = {g: "test" for g in groups[-fifth:]} | {g: "val" for g in groups[-2 * fifth : -fifth]}
        assign = {name: role_of.get(group_id(name), "train") for name in names}
        rule = f"by group, sorted: test = last {fifth} groups, val = the {fifth} before"
    mpp = folder_mpp(root) or 0.25
    return Domain(root.name, root.name, root, mpp, _names_by_role(root, assign), rule, str(root))


@dataclass(frozen=True)
class SplitFolders:
    """Per-split folders of symlinks: labelled train+val (val marked in split.tsv), unlabelled train, test."""

    labelled: Path
    unlabelled: Path
    test: Path


def build_split_folders(domain: Domain, cache: Path) -> SplitFolders:
    """Symlink folders under the cache; the unlabelled folder holds images only, so masks cannot leak."""
    base = cache / "splits" / f"{domain.key}-{_digest(str(domain.root))[:8]}"
    pairs = {image.stem: (image, mask) for image, mask in find_pairs(domain.root)}
    out = SplitFolders(base / "labelled", base / "unlabelled", base / "test")
    if base.exists():
        shutil.rmtree(base)

    def link(folder: Path, names: Sequence[str], *, masks: bool) -> None:
        (folder / "images").mkdir(parents=True)
        if masks:
            (folder / "masks").mkdir()
        for name in names:
            image, mask = pairs[name]
            (folder / "images" / image.name).symlink_to(image.resolve())
            if masks:
                (folder / "masks" / mask.name).symlink_to(mask.resolve())
        (folder / "mpp.txt").write_text(f"{domain.mpp}\n")

    link(out.labelled, domain.splits["train"] + domain.splits["val"], masks=True)
    rows = [f"{n}\ttrain" for n in domain.splits["train"]] + [f"{n}\tval" for n in domain.splits["val"]]
    (out.labelled / "split.tsv").write_text("\n".join(rows) + "\n")
    link(out.unlabelled, domain.splits["train"], masks=False)
    link(out.test, domain.splits["test"], masks=True)
    return out


# ------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    name: str
    preset: str
    crf: bool
    seeds: int
    train_on: str = "source"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """One cell's seed: a training run and its scores on the target's test split.

    Specs that train alike share one training run (``train_key``): `ours` and `ours-no-crf`, and the oracle
    of a pair with the source-only model of the reverse pair.
    """

    source: Domain
    target: Domain
    method: Method
    seed: int
    training: dict[str, Any]
    hardware_kind: str

    @property
    def train_domain(self) -> Domain:
        return self.target if self.method.train_on == "target" else self.source

    @property
    def adapts(self) -> bool:
        return self.method.train_on == "source" and self.method.preset != "source-only"

    def train_identity(self) -> dict[str, Any]:
        """Everything that determines the trained model (and nothing else, such as the method's name)."""

        def domain(d: Domain) -> list[Any]:
            return [d.location, d.mpp, d.splits]

        identity = {
            "cache_version": CACHE_VERSION,
            "train": domain(self.train_domain),
            "adapt_to": domain(self.target) if self.adapts else None,
            "preset": self.method.preset,
            "overrides": dict(sorted(self.method.overrides.items())),
            "seed": self.seed,
            "training": dict(sorted(self.training.items())),
            "hardware": self.hardware_kind,
        }
        init = self.training.get("init", "scratch")
        if init != "scratch":  # a run started from a model file is as new as that file's weights
            from wsiuda.models import default_model_path

            weights = default_model_path() if init == "default" else Path(init)
            identity["init_weights"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        return identity

    @property
    def train_key(self) -> str:
        return _digest(json.dumps(self.train_identity(), sort_keys=True, default=str))[:16]

    def score_identity(self) -> dict[str, Any]:
        return {
            "train_key": self.train_key,
            "test": [self.target.location, self.target.mpp, self.target.splits["test"]],
            "threshold": 0.5,
            "crf_chosen_on": "train-domain validation",
            "crf_candidates": {name: dataclasses.asdict(p) for name, p in CRF_CANDIDATES.items()},
        }

    @property
    def key(self) -> str:
        return _digest(json.dumps(self.score_identity(), sort_keys=True, default=str))[:16]


def command_line() -> str:
    """This invocation as a shell command, with the interpreter relative to the repository where it lies."""
    python = Path(sys.executable)
    shown = str(python.relative_to(REPO)) if python.is_relative_to(REPO) else python.name
    return shlex.join([shown, *sys.argv])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------- hardware
def hardware(device: str) -> tuple[str, str]:
    """(kind used in cache keys, description for the report)."""
    import torch

    from wsiuda.models import resolve_device

    resolved = resolve_device(device)
    cpu = cpu_model()
    cores = os.cpu_count()
    if resolved.type == "cuda":
        name = torch.cuda.get_device_name(resolved)
        return f"cuda:{name}", f"GPU {name} (torch {torch.__version__}); host {cpu}, {cores} cores"
    return (
        "cpu",
        f"CPU only: {cpu}, {cores} cores (nproc), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    )


# -------------------------------------------------------------------------------------------------- runs
def train_one(
    spec: RunSpec, folders: dict[str, SplitFolders], cache: Path, *, device: str, progress: bool
) -> Path:
    """Train (or find cached) the run of ``spec``; its model is chosen on source validation by fit."""
    from wsiuda.train import AdaptConfig, fit

    folder = cache / "runs" / spec.train_key
    done = folder / "training.json"
    if done.is_file():
        return folder
    if folder.exists():
        log.info("%s: an interrupted run; starting it again", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = AdaptConfig(
        source=(folders[spec.train_domain.key].labelled,),
        target=(folders[spec.target.key].unlabelled,) if spec.adapts else (),
        output=folder / "run",
        method=spec.method.preset,
        seed=spec.seed,
        device=device,
        image_mpp=spec.train_domain.mpp,
        **spec.training,
        **spec.method.overrides,
    )
    started = time.monotonic()
    run_dir = fit(config, progress=progress)
    seconds = time.monotonic() - started
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    training = {
        "train_key": spec.train_key,
        "identity": spec.train_identity(),
        "command": command_line(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(seconds, 1),
        "iterations": int(sum(entry["iterations"] for entry in history)),
        "epochs": summary["epochs_done"],
        "best_epoch": summary["best_epoch"],
        "best_source_val_dice": summary["best_source_val_dice"],
        "stopped_by": summary["stopped_by"],
    }
    (run_dir / "last.pt").unlink(missing_ok=True)  # the resumable checkpoint is not needed once finished
    atomic_write_text(done, json.dumps(training, indent=1) + "\n")
    return folder


def score_one(
    spec: RunSpec, folders: dict[str, SplitFolders], cache: Path, *, device: str, progress: bool
) -> dict[str, Any]:
    """The trained model of ``spec`` scored on the target's test split, with and without the CRF (cached).

    The CRF is the candidate of best Dice on the validation split of the domain the run was trained on.
    """
    from wsiuda.metrics import summarize
    from wsiuda.models import Segmenter

    folder = cache / "runs" / spec.train_key
    path = folder / f"scores-{spec.key}.json"
    if path.is_file():
        result: dict[str, Any] = json.loads(path.read_text())
        return result
    folder = train_one(spec, folders, cache, device=device, progress=progress)
    training = json.loads((folder / "training.json").read_text())
    segmenter = Segmenter.load(folder / "run" / "model.pt", device=device)
    started = time.monotonic()
    validation = score_pairs(
        segmenter,
        labelled_pairs(folders[spec.train_domain.key].labelled, split="val"),
        data_mpp=spec.train_domain.mpp,
        variants=CRF_CANDIDATES,
        progress=progress,
    )
    val_dice = {name: summarize(rows).dice for name, rows in validation.items()}
    chosen = max(CRF_CANDIDATES, key=lambda name: val_dice[name])  # the first of equals
    scores = score_pairs(
        segmenter,
        labelled_pairs(folders[spec.target.key].test),
        data_mpp=spec.target.mpp,
        variants={"network": None, "crf": CRF_CANDIDATES[chosen]},
        progress=progress,
    )
    result = {
        "key": spec.key,
        "pair": [spec.source.key, spec.target.key],
        "seed": spec.seed,
        **{k: v for k, v in training.items() if k != "identity"},
        "train_identity": training["identity"],
        "test": spec.target.key,
        "scored_by": command_line(),
        "eval_seconds": round(time.monotonic() - started, 1),
        "crf": {"chosen": chosen, "validation_dice": val_dice},
        "scores": {
            name: {"summary": summarize(rows).as_dict(), "images": [row.as_dict() for row in rows]}
            for name, rows in scores.items()
        },
    }
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def cached_result(spec: RunSpec, cache: Path) -> dict[str, Any] | None:
    path = cache / "runs" / spec.train_key / f"scores-{spec.key}.json"
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    return result


# ------------------------------------------------------------------------------------------------- report
def fmt(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return "not run"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


@dataclass
class Cell:
    pair: tuple[str, str]
    method: str
    variant: str
    seeds_planned: int
    results: list[dict[str, Any]]

    def values(self, metric: str) -> list[float]:
        return [r["scores"][self.variant]["summary"][metric] for r in self.results]

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_std(self.values(metric))

    def to_dict(self) -> dict[str, Any]:
        stats = {}
        for metric in METRICS:
            mean, std = self.stat(metric)
            stats[metric] = {"mean": mean, "std": std, "values": self.values(metric)}
        return {
            "pair": list(self.pair),
            "method": self.method,
            "scored": "after dense CRF" if self.variant == "crf" else "network output",
            "seeds_planned": self.seeds_planned,
            "seeds_done": sorted(r["seed"] for r in self.results),
            "runs": [r["key"] for r in self.results],
            **stats,
        }


def gap_closure(cells: dict[tuple[str, str], Cell], metric: str) -> dict[str, float | None]:
    """(method − source-only) / (oracle − source-only) of seed means, on one pair's cells."""
    base, oracle = cells.get(("source-only", metric)), cells.get(("oracle", metric))
    out: dict[str, float | None] = {}
    for (method, m), cell in cells.items():
        if m != metric:
            continue
        if not (base and oracle and base.results and oracle.results and cell.results):
            out[method] = None
            continue
        low, high = base.stat(metric)[0], oracle.stat(metric)[0]
        out[method] = None if high - low <= 0 else (cell.stat(metric)[0] - low) / (high - low)
    return out


def write_report(
    *,
    grid: list[RunSpec],
    methods: dict[str, Method],
    pairs: list[tuple[Domain, Domain]],
    results: dict[str, dict[str, Any]],
    failures: dict[str, str],
    settings: dict[str, Any],
    out_md: Path,
    out_json: Path,
) -> None:
    cells: dict[tuple[str, str], dict[str, Cell]] = {}
    for source, target in pairs:
        pair = (source.key, target.key)
        by_method: dict[str, Cell] = {}
        for name, method in methods.items():
            specs = [s for s in grid if s.method.name == name and (s.source.key, s.target.key) == pair]
            done = [results[s.key] for s in specs if s.key in results]
            by_method[name] = Cell(pair, name, "crf" if method.crf else "network", len(specs), done)
        cells[pair] = by_method

    titles = {d.key: d.title for pair in pairs for d in pair}

    def pair_title(pair: tuple[str, str]) -> str:
        return f"{titles[pair[0]]} → {titles[pair[1]]}"

    main_pair = (pairs[0][0].key, pairs[0][1].key)
    closure = {
        metric: gap_closure({(m, metric): c for m, c in cells[main_pair].items()}, metric)
        for metric in ("dice", "iou")
    }
    finished = sorted(r["finished"] for r in results.values())
    commands = sorted({c for r in results.values() for c in (r["command"], r["scored_by"])})

    lines = [
        "# Cross-domain nucleus segmentation: MoNuSeg 2018 ↔ TNBC",
        "",
        f"Report written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/uda.py`; runs "
        + (f"finished {finished[0][:16]} to {finished[-1][:16]} UTC." if finished else "none finished yet."),
        "",
        f"- **Hardware:** {settings['hardware']}.",
        f"- **Budget per run:** {settings['budget']} (the same for every method).",
        f"- **Training settings (every run):** `{json.dumps(settings['training'])}`.",
        f"- **Seeds:** {settings['seeds']}.",
        f"- **Grid:** {len(grid)} (pair, method, seed) entries from {len({s.train_key for s in grid})}"
        f" training runs; {sum(s.key in results for s in grid)} entries done"
        + (f", {len(failures)} failed" if failures else "")
        + ". Cells marked *not run* have no finished run at these settings.",
        "- **Model selection:** each run keeps the weights of its best *source*-validation Dice; target"
        " labels are used only to score the final model on the target test split (and to train the oracle).",
        "- **Scoring:** whole target test images at 0.25 µm/px, threshold 0.5; Dice and IoU per image, then"
        " averaged over images (the paper's convention); the tables give the mean ± sample std over seeds of"
        " that average. Rows of `ours` and its ablations (except *no CRF*) are scored after a dense CRF, the"
        " others on the network's output. Each run's CRF is the one of best per-image Dice on the validation"
        " split of the domain it was trained on (the source, or the target for the oracle), out of"
        f" {settings['crf']}; *Every run* names the choice.",
        "- **Domains and splits (fixed, never tuned):**",
        *[f"  - {d.describe()}" for d in {d.key: d for pair in pairs for d in pair}.values()],
        "- **Commands that trained and scored the runs shown:**",
        *([f"  - `{c}`" for c in commands] or ["  - (none yet)"]),
        f"- **This report:** `{settings['report_command']}`",
        "",
    ]
    if settings["reduced"]:
        lines += [f"**Reduced budget.** {settings['reduced']}", ""]

    # Main table in the paper's layout, with the paper's Table 1 beside it.
    header = ["Method"]
    for pair in cells:
        header += [f"{pair_title(pair)} IoU", f"{pair_title(pair)} Dice"]
    header += [f"paper: {c} IoU / Dice" for c in PAPER_COLUMNS]
    lines += [
        "## Results (IoU and Dice on the target test split) and the paper's Table 1",
        "",
        "The right-hand columns copy the paper's Table 1 (Li et al. 2021), measured on **other data** (KIRC,"
        " TCIA and TNBC with the paper's own splits, budget and networks): they are not comparable number for"
        " number and are shown for the layout and the ordering of methods only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name in methods:
        row = [name]
        for pair in cells:
            cell = cells[pair][name]
            for metric in ("iou", "dice"):
                row.append(fmt(*cell.stat(metric), len(cell.results)))
        paper = PAPER_TABLE1.get(name)
        row += [f"{iou:.4f} / {dice:.4f}" for iou, dice in paper] if paper else ["—"] * len(PAPER_COLUMNS)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    lines += [
        f"## Gap closure on {pair_title(main_pair)}",
        "",
        "(method − source-only) / (oracle − source-only), on the seed means; 1 would match the"
        " target-supervised oracle, 0 the source-only model, below 0 is worse than source-only.",
        "",
        "| Method | Dice gap closure | IoU gap closure | Dice (mean ± std) | seeds |",
        "|---|---|---|---|---|",
    ]
    for name in methods:
        cell = cells[main_pair][name]
        d, i = closure["dice"].get(name), closure["iou"].get(name)
        lines.append(
            f"| {name} | {'n/a' if d is None else f'{d:+.2f}'} | {'n/a' if i is None else f'{i:+.2f}'} | "
            f"{fmt(*cell.stat('dice'), len(cell.results))} | {len(cell.results)}/{cell.seeds_planned} |"
        )
    lines.append("")

    lines += targets_note(cells, main_pair, pairs, closure["dice"], pair_title)

    lines += [
        "## Instance scores (object F1 at IoU 0.5, AJI, PQ) and pooled Dice",
        "",
        "| Pair | Method | F1 | AJI | PQ | pooled Dice |",
        "|---|---|---|---|---|---|",
    ]
    for pair in cells:
        for name in methods:
            cell = cells[pair][name]
            n = len(cell.results)
            if n:
                lines.append(
                    f"| {pair_title(pair)} | {name} | "
                    + " | ".join(fmt(*cell.stat(m), n) for m in ("f1", "aji", "pq", "pooled_dice"))
                    + " |"
                )
    lines.append("")

    lines += [
        "## Every run",
        "",
        "Dice is the per-image mean on the target test split, for the network's output and after the CRF."
        " *fit s* is the wall-clock time of the whole training call (data loading and the last validation"
        " included); *val Dice* is the best validation Dice on the domain the run trained on, which chose its"
        " weights.",
        "",
        "| Pair | Method (preset, overrides) | seed | iterations | epochs (best) | fit s |"
        " val Dice | Dice | CRF (chosen on validation) | Dice + CRF | key |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for spec in grid:
        if spec.key in seen or spec.key not in results:
            continue
        seen.add(spec.key)
        r = results[spec.key]
        label = spec.method.preset + (
            f" {json.dumps(spec.method.overrides)}" if spec.method.overrides else ""
        )
        label += " (trained on target labels)" if spec.method.train_on == "target" else ""
        lines.append(
            f"| {pair_title((spec.source.key, spec.target.key))} | {label} | {r['seed']} | "
            f"{r['iterations']} | "
            f"{r['epochs']} ({r['best_epoch']}) | {r['train_seconds']:.0f} | "
            f"{r['best_source_val_dice']:.4f} | {r['scores']['network']['summary']['dice']:.4f} | "
            f"{r['crf']['chosen']} | {r['scores']['crf']['summary']['dice']:.4f} | `{r['key']}` |"
        )
    if failures:
        lines += ["", "Failed runs:", *[f"- `{key}`: {message}" for key, message in failures.items()]]
    lines.append("")
    atomic_write_text(out_md, "\n".join(lines))

    document = {
        "settings": settings,
        "pairs": [[s.key, t.key] for s, t in pairs],
        "domains": {
            d.key: {
                "title": d.title,
                "location": d.location,
                "mpp": d.mpp,
                "split_rule": d.split_rule,
                "splits": {k: list(v) for k, v in d.splits.items()},
            }
            for pair in pairs
            for d in pair
        },
        "cells": [cell.to_dict() for by_method in cells.values() for cell in by_method.values()],
        "gap_closure": {"pair": list(main_pair), **closure},
        "paper_table1": {
            "columns": list(PAPER_COLUMNS),
            "rows": PAPER_TABLE1,
            "note": "other data (KIRC, TCIA)",
        },
        "runs": [
            {k: v for k, v in results[key].items() if k != "scores"}
            | {"scores": {n: s["summary"] for n, s in results[key]["scores"].items()}}
            for key in sorted({s.key for s in grid if s.key in results})
        ],
        "failures": failures,
    }
    atomic_write_text(out_json, json.dumps(document, indent=1) + "\n")


def targets_note(
    cells: dict[tuple[str, str], dict[str, Cell]],
    main_pair: tuple[str, str],
    pairs: list[tuple[Domain, Domain]],
    closure: dict[str, float | None],
    pair_title: Any,
) -> list[str]:
    """The project's targets for adaptation, checked on the numbers above (Dice)."""
    lines = ["## Targets, checked on these numbers (Dice)", ""]
    main = cells[main_pair]
    ours = main.get("ours")
    if ours is None or not ours.results:
        return [*lines, "`ours` has no finished run on the main pair yet.", ""]
    mean, std = ours.stat("dice")
    gap = closure.get("ours")
    if gap is None:
        lines.append(
            f"- {pair_title(main_pair)}: the gap closure of `ours` cannot be computed yet (it needs finished"
            " `source-only` and `oracle` runs, and an oracle ahead of source-only)."
        )
    else:
        verdict = "met" if gap >= 0.5 else f"not met, short by {0.5 - gap:.2f}"
        lines.append(
            f"- {pair_title(main_pair)}: `ours` closes {gap:.2f} of the gap (target ≥ 0.5: {verdict})."
        )
    baselines = ("source-only", "source-only+stain", "da-adv", "cbst", "cellseguda")
    for name in baselines:
        cell = main.get(name)
        if cell is None or not cell.results:
            continue
        b_mean, b_std = cell.stat("dice")
        margin = mean - b_mean
        if len(ours.results) < 2 or len(cell.results) < 2:
            lines.append(
                f"  - vs {name}: {margin:+.4f} Dice; one seed on a side, so no seed std to compare it with."
            )
            continue
        spread = max(std, b_std)
        verdict = "ahead by more than" if margin > spread else "not ahead by more than"
        lines.append(f"  - vs {name}: {margin:+.4f} Dice, {verdict} the larger seed std ({spread:.4f}).")
    for source, target in pairs[1:]:
        pair = (source.key, target.key)
        ours_cell, stain = cells[pair].get("ours"), cells[pair].get("source-only+stain")
        if ours_cell and stain and ours_cell.results and stain.results:
            o, o_std = ours_cell.stat("dice")
            s, s_std = stain.stat("dice")
            ok = o >= s - max(o_std, s_std)
            seeds = min(len(ours_cell.results), len(stain.results))
            lines.append(
                f"- {pair_title(pair)}: `ours` {o:.4f} vs `source-only+stain` {s:.4f}: "
                + ("no negative transfer (within one std)" if ok else "negative transfer beyond one std")
                + (" (one seed on a side: std 0)." if seeds < 2 else ".")
            )
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=HERE / "uda_config.yaml")
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared"))
    )
    parser.add_argument("--pairs", help="Comma-separated source:target keys to run (default: every pair).")
    parser.add_argument("--methods", help="Comma-separated method names to run (default: every method).")
    parser.add_argument(
        "--max-seeds",
        type=int,
        help="Run only seeds below N now; the report still covers every method's configured seeds.",
    )
    parser.add_argument(
        "--budget-minutes", type=float, help="Training minutes per run (overrides the config)."
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Override a training setting (an AdaptConfig field), e.g. --set consistency_peak=3; repeatable.",
    )
    parser.add_argument("--source", type=Path, help="A labelled folder as source (with --target).")
    parser.add_argument("--target", type=Path, help="A labelled folder as target (with --source).")
    parser.add_argument("--device", default="auto", help="auto (a GPU where present), cpu or cuda.")
    parser.add_argument("--cache-dir", type=Path, default=HERE / "cache")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="Report file stem (default: uda, or uda-SOURCE-TARGET for --source).")
    parser.add_argument(
        "--reduced", default="", help="A sentence for the report on why the budget is reduced."
    )
    parser.add_argument("--report-only", action="store_true", help="Write the report from cached runs only.")
    parser.add_argument("--dry-run", action="store_true", help="List the runs and whether they are cached.")
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    if (args.source is None) != (args.target is None):
        parser.error("--source and --target go together")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except WsiudaError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    if args.source is not None:
        source, target = domain_from_folder(args.source), domain_from_folder(args.target)
        if source.key == target.key:
            target = dataclasses.replace(target, key=target.key + "-target")
        pairs = [(source, target)]
        name = args.name or f"uda-{source.key}-{target.key}"
    else:
        if not args.shared.is_dir():
            raise ConfigError(
                f"shared data folder {args.shared} is absent; pass --shared or set WSIUDA_SHARED"
            )
        domains = {key: domain_from_spec(key, spec, args.shared) for key, spec in config["domains"].items()}
        pairs = [(domains[s], domains[t]) for s, t in config["pairs"]]
        name = args.name or "uda"
    for source, target in pairs:
        if source.mpp != target.mpp:
            raise ConfigError(f"{source.key} ({source.mpp}) and {target.key} ({target.mpp}) differ in mpp")

    training = dict(config["training"])
    if args.budget_minutes is not None:
        training["budget_minutes"] = args.budget_minutes
    for assignment in args.set:
        field_name, sep, value = assignment.partition("=")
        if not sep:
            raise ConfigError(f"--set {assignment}: expected FIELD=VALUE")
        training[field_name.strip().replace("-", "_")] = yaml.safe_load(value)
    methods = {
        key: Method(
            name=key,
            preset=m["preset"],
            crf=bool(m["crf"]),
            seeds=int(m["seeds"]),
            train_on=m.get("train_on", "source"),
            overrides=dict(m.get("overrides", {})),
        )
        for key, m in config["methods"].items()
    }
    kind, described = hardware(args.device)
    grid = [
        RunSpec(source, target, method, seed, training, kind)
        for seed in range(max(m.seeds for m in methods.values()))
        for source, target in pairs
        for method in methods.values()
        if seed < method.seeds
    ]
    chosen_pairs = None if not args.pairs else {tuple(p.split(":")) for p in args.pairs.split(",")}
    chosen_methods = None if not args.methods else set(args.methods.split(","))
    for label, chosen, known in (
        ("pair", chosen_pairs, {(s.key, t.key) for s, t in pairs}),
        ("method", chosen_methods, set(methods)),
    ):
        unknown = set(chosen or ()) - known
        if unknown:
            raise ConfigError(f"unknown {label}(s) {sorted(unknown)}; known: {sorted(known)}")
    todo = [
        spec
        for spec in grid
        if (chosen_pairs is None or (spec.source.key, spec.target.key) in chosen_pairs)
        and (chosen_methods is None or spec.method.name in chosen_methods)
        and (args.max_seeds is None or spec.seed < args.max_seeds)
    ]

    cache = args.cache_dir
    results: dict[str, dict[str, Any]] = {}
    for spec in grid:
        found = cached_result(spec, cache)
        if found is not None:
            results[spec.key] = found
    unique_todo = list({spec.key: spec for spec in todo if spec.key not in results}.values())
    trainings = {
        spec.train_key
        for spec in unique_todo
        if not (cache / "runs" / spec.train_key / "training.json").is_file()
    }
    log.info(
        "%d scored runs in the grid, %d cached; %d selected to do (%d trainings)",
        len({s.key for s in grid}), len(results), len(unique_todo), len(trainings),
    )  # fmt: skip
    if args.dry_run:
        for spec in todo:
            state = "cached" if spec.key in results else "to do"
            print(
                f"{spec.source.key}->{spec.target.key} {spec.method.name} seed {spec.seed}: "
                f"training {spec.train_key}, {state}"
            )
        return 0

    settings = {
        "hardware": described,
        "device": args.device,
        "budget": (
            f"{training['budget_minutes']} min of training (wall clock, source validation included) on the"
            " hardware above"
            if training.get("budget_minutes")
            else f"{training.get('epochs')} epochs of {training.get('iters_per_epoch')} iterations"
        ),
        "training": training,
        "seeds": ", ".join(f"{m.name} {m.seeds}" for m in methods.values()),
        "crf": "; ".join(
            f"{name}: {json.dumps(dataclasses.asdict(params))}" for name, params in CRF_CANDIDATES.items()
        ),
        "reduced": args.reduced,
        "report_command": command_line(),
        "config_file": str(
            args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
        ),
        "config": config,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out_md, out_json = args.results_dir / f"{name}.md", args.results_dir / f"{name}.json"
    failures: dict[str, str] = {}

    def report() -> None:
        write_report(grid=grid, methods=methods, pairs=pairs, results=results, failures=failures,
                     settings=settings, out_md=out_md, out_json=out_json)  # fmt: skip

    if not args.report_only and unique_todo:
        folders = {d.key: build_split_folders(d, cache) for pair in pairs for d in pair}
        for number, spec in enumerate(unique_todo, start=1):
            log.info("run %d/%d: %s -> %s, %s, seed %d (%s)", number, len(unique_todo), spec.source.key,
                     spec.target.key, spec.method.name, spec.seed, spec.key)  # fmt: skip
            try:
                results[spec.key] = score_one(
                    spec, folders, cache, device=args.device, progress=not args.quiet
                )
            except WsiudaError as error:
                failures[spec.key] = str(error)
                log.error("run %s failed: %s", spec.key, error)
            report()
    report()
    log.info("wrote %s and %s", out_md, out_json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
