"""benchmarks/common.py's measured run: what it reports of a command's process tree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A parent that starts a child holding 300 MB and spinning for a second: both must be counted.
TREE = """
import multiprocessing, time
def hold():
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])
    end = time.process_time() + 1.0
    while time.process_time() < end:
        pass
if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=hold)
    child.start()
    child.join()
    print("done")
"""


def load_common():
    spec = importlib.util.spec_from_file_location("benchmark_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_measured_run_counts_the_memory_and_cpu_of_the_commands_children(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    measured = load_common().run_measured([sys.executable, str(script)])
    assert measured["stdout"] == "done"
    assert measured["peak_rss_mb"] > 300
    assert measured["cpu_s"] > 0.8
    assert measured["wall_s"] >= 1.0
