"""`make demo`: segment a real slide with the default model and write what QuPath and a person look at.

    python examples/demo.py --slide ../shared/slides/CMU-1-Small-Region.svs --out demo/

Writes OUT/nuclei.geojson (QuPath: File > Import objects, or drag and drop), OUT/nuclei.overlay.png (outlines
on the slide) and OUT/nuclei.summary.json. Where the slide is absent (a fresh clone without the shared data
folder), a small pyramidal slide is built from the H&E-like immunohistochemistry image that scikit-image ships
(`ihc.png`, assumed 0.25 µm/px), and the demo says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def fallback_slide(out: Path) -> Path:
    """A 2-level pyramidal SVS made from scikit-image's bundled ihc.png (512 x 512 px)."""
    import skimage.data

    from wsiuda.io.tiffwriter import write_pyramidal_tiff

    path = out / "skimage-ihc.svs"
    write_pyramidal_tiff(path, skimage.data.immunohistochemistry(), mpp=0.25, app_mag=40, tile=256, levels=2)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, required=True, help="The slide to segment, if present.")
    parser.add_argument("--out", type=Path, default=Path("demo"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.slide
    if not slide.is_file():
        slide = fallback_slide(args.out)
        print(f"{args.slide} is absent: segmenting {slide}, built from scikit-image's ihc.png, instead.")
    geojson = args.out / "nuclei.geojson"
    wsiuda = Path(sys.executable).with_name("wsiuda")
    command = [str(wsiuda), "segment", str(slide), "-o", str(geojson)]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        return result.returncode
    summary = json.loads((args.out / "nuclei.summary.json").read_text(encoding="utf-8"))
    print(f"\n{summary.get('nuclei', summary.get('counts'))} nuclei in {slide.name}. Outputs in {args.out}/:")
    for path in sorted(args.out.iterdir()):
        print(f"  {path.name}")
    print("Open the slide in QuPath and drag nuclei.geojson onto it (or File > Import objects).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
