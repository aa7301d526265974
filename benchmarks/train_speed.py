"""Training speed on this machine: U-Net width sweep, and seconds per epoch of `source-only` and `ours`.

TNBC is the source and the MoNuSeg images not marked test in split.tsv are the target (as `wsiuda adapt`
reads them). Each method runs in its own process, so its peak resident memory is its own, once with glibc's
default malloc and once with malloc set to reuse freed memory, as the `wsiuda` command sets it
(wsiuda.allocator). The width sweep runs in this process, set that way. Results go to
benchmarks/results/train_speed.{md,json}.

    nice python benchmarks/train_speed.py [--shared ../shared] [--epochs 2] [--iters-per-epoch 25]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_model  # noqa: E402


def width_sweep(widths: list[int], *, batch: int, size: int, repeats: int) -> list[dict[str, float]]:
    """Seconds of one forward + backward + Adam step of S (depth 4) and of D, at batch x 3 x size²."""
    import torch

    from wsiuda.models import build_discriminator, build_unet
    from wsiuda.models.unet import channels_last

    rows = []
    for width in widths:
        net = channels_last(build_unet(width=width, depth=4))
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        optimiser = torch.optim.Adam(net.parameters())
        times = []
        for repeat in range(repeats + 1):
            started = time.perf_counter()
            optimiser.zero_grad()
            net(x).mean().backward()
            optimiser.step()
            if repeat:  # the first pass warms up the kernels
                times.append(time.perf_counter() - started)
        rows.append({"net": "S (U-Net, depth 4)", "width": width, "seconds": min(times)})
    for width in (32, 64):
        disc = channels_last(build_discriminator(width=width))
        p = torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
        times = []
        for repeat in range(repeats + 1):
            started = time.perf_counter()
            disc.zero_grad()
            disc(p).mean().backward()
            if repeat:
                times.append(time.perf_counter() - started)
        rows.append({"net": "D (FCDiscriminator)", "width": width, "seconds": min(times)})
    return rows


def peak_rss_kib() -> int:
    """This process's peak resident memory: VmHWM belongs to the process image, so unlike ru_maxrss it does
    not carry over the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def one_method(method: str, shared: Path, epochs: int, iters: int, malloc: str) -> dict[str, object]:
    """Train ``method`` for ``epochs`` in this process and report its epoch times and peak RSS; ``malloc``
    "reuse" first sets this process's malloc as the `wsiuda` command sets its own."""
    from wsiuda.allocator import reuse_freed_memory
    from wsiuda.train import AdaptConfig, fit

    if malloc == "reuse" and not reuse_freed_memory():
        raise SystemExit("malloc could not be set (not glibc)")

    datasets = shared / "datasets"
    with tempfile.TemporaryDirectory() as tmp:
        config = AdaptConfig(
            source=(datasets / "tnbc",),
            target=(datasets / "monuseg2018",) if method != "source-only" else (),
            output=Path(tmp) / "run",
            method=method,
            epochs=epochs,
            iters_per_epoch=iters,
            device="cpu",
        )
        started = time.perf_counter()
        run = fit(config, progress=False)
        total = time.perf_counter() - started
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peak_kib = peak_rss_kib()
    return {
        "method": method,
        "malloc": malloc,
        "epoch_seconds": [entry["epoch_seconds"] for entry in history],
        "seconds_per_iteration": history[-1]["epoch_seconds"] / history[-1]["iterations"],
        "wall_seconds_with_loading_and_validation": round(total, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "width": config.width,
        "batch_size": config.batch_size,
        "patch_size": config.patch_size,
        "iters_per_epoch": iters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("WSIUDA_SHARED", REPO.parent / "shared"))
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters-per-epoch", type=int, default=25)
    parser.add_argument("--methods", nargs="+", default=["source-only", "ours"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_method(args.one, args.shared, args.epochs, args.iters_per_epoch, args.malloc)))
        return
    if not (args.shared / "datasets" / "tnbc").is_dir():
        sys.exit(f"{args.shared}/datasets/tnbc is absent; pass --shared")
    import torch

    from wsiuda.allocator import reuse_freed_memory

    load_before = os.getloadavg()[0]
    reuse_freed_memory()  # the sweep's process, as `wsiuda adapt` and `train` run
    sweep = width_sweep([8, 16, 32], batch=8, size=256, repeats=2)
    methods = []
    for method in args.methods:
        for malloc in ("default", "reuse"):
            command = [sys.executable, __file__, "--one", method, "--shared", str(args.shared),
                       "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch),
                       "--malloc", malloc]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            methods.append(json.loads(output.strip().splitlines()[-1]))
    for m in methods:
        base = next(b for b in methods if b["method"] == methods[0]["method"] and b["malloc"] == m["malloc"])
        m["ratio_to_source_only"] = round(m["seconds_per_iteration"] / base["seconds_per_iteration"], 2)  # type: ignore[operator]
    hardware = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": "none (CPU only)",
        # Other work on the same cores slows every figure alike; the load average says how busy it was.
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    command_line = "nice .venv/bin/python benchmarks/train_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (("epochs", args.epochs), ("iters_per_epoch", args.iters_per_epoch))
    )
    document = {"hardware": hardware, "command": command_line, "width_sweep": sweep, "methods": methods}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "train_speed.md").write_text(markdown(document))
    print((RESULTS / "train_speed.md").read_text())


def load_text(hardware: dict) -> str:  # type: ignore[type-arg]
    loads = hardware.get("load_average_1min_before_after")
    return "not recorded" if not loads else f"{loads[0]} before, {loads[1]} after"


def markdown(document: dict) -> str:  # type: ignore[type-arg]
    hw = document["hardware"]
    lines = [
        "# Training speed",
        "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['gpu']}; torch {hw['torch']} with "
        f"{hw['torch_threads']} threads. The machine was shared with other work while this ran (1-minute "
        f"load average {load_text(hw)}), so absolute times are upper bounds; the ratios were measured "
        "side by side in one run.",
        "",
        f"Command: `{document['command']}`",
        "",
        "## Network cost: one forward + backward (+ Adam) pass, batch 8 of 3 x 256², channels_last, malloc "
        "reusing freed memory",
        "",
        "| network | width | seconds | ratio to width 8 |",
        "|---|---:|---:|---:|",
    ]
    sweep = document["width_sweep"]
    s8 = next(r["seconds"] for r in sweep if r["width"] == 8)
    for row in sweep:
        ratio = f"{row['seconds'] / s8:.2f}" if row["net"].startswith("S") else "-"
        lines.append(f"| {row['net']} | {row['width']} | {row['seconds']:.3f} | {ratio} |")
    lines += [
        "",
        "The default width is 8, the fastest of the three on this CPU (see the ratios); D's default width is "
        "32 (AdaptSegNet uses 64). Wider nets are for GPUs (`--width 16` or `32`).",
        "",
        "## Seconds per epoch: TNBC (source) → MoNuSeg images not marked test (target)",
        "",
        "An epoch is `iters_per_epoch` iterations of a batch of 8 random 256² patches at 0.25 µm/px (and 8 "
        "target patches for `ours`); epoch time excludes validation. The last epoch's time is reported (the "
        "first includes warm-up).",
        "",
        "| method | malloc | width | iterations / epoch | s / epoch (each epoch) | s / iteration "
        "| s / default epoch (25 it.) | ratio to source-only | peak RSS (MiB) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in document["methods"]:
        epochs = ", ".join(f"{s:.1f}" for s in m["epoch_seconds"])
        malloc = {"default": "glibc's default", "reuse": "reuses freed memory (as `wsiuda`)"}.get(
            str(m.get("malloc", "default")), "glibc's default"
        )
        lines.append(
            f"| {m['method']} | {malloc} | {m['width']} | {m['iters_per_epoch']} | {epochs} "
            f"| {m['seconds_per_iteration']:.2f} | {25 * m['seconds_per_iteration']:.0f} "
            f"| {m['ratio_to_source_only']:.2f} "
            f"| {m['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "`ours` runs S three times per iteration (source, target, transformed target), D twice and R once, "
        "hence its ratio. Peak RSS is the whole training process: datasets decoded in memory, networks, "
        "optimiser state and the batch prefetch. The `wsiuda` command sets its process's malloc to reuse "
        "freed memory (wsiuda.allocator); each setting ran in a process of its own, one after the other.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
