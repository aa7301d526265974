"""malloc set to reuse freed memory: the effect itself, and the processes `wsiuda segment` gives it to.

Each check runs in a process of its own (a child, or a CRF helper), so the test process keeps its malloc.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)

# Page faults taken by the second of two rounds of allocating, touching and freeing 64 MB: each
# round faults every page in afresh when freed memory goes back to the kernel, none when it is kept.
FAULTS_OF_A_SECOND_ROUND = """
import ctypes
import resource

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def faults_of_a_second_round():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 * 2**20)
        ctypes.memset(block, 1, 64 * 2**20)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
PAGES_OF_64_MB = 64 * 2**20 // 4096


def run_child(code: str, env: dict[str, str] | None = None) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_freed_memory_is_reused_once_set() -> None:
    result = run_child(
        FAULTS_OF_A_SECOND_ROUND
        + "import json\n"
        + "from wsiuda.allocator import reuse_freed_memory\n"
        + "plain = faults_of_a_second_round()\n"
        + "applied = reuse_freed_memory()\n"
        + "print(json.dumps({'applied': applied, 'plain': plain, 'set': faults_of_a_second_round()}))\n"
    )
    assert result["applied"] is True
    assert result["plain"] > 0, "glibc's default should map the block afresh"
    assert result["set"] * 20 < result["plain"], result


def test_the_environment_for_other_processes_has_the_same_effect() -> None:
    from wsiuda.allocator import ENVIRONMENT

    code = FAULTS_OF_A_SECOND_ROUND + "import json\nprint(json.dumps({'set': faults_of_a_second_round()}))\n"
    result = run_child(code, env={**os.environ, **ENVIRONMENT})
    assert result["set"] < PAGES_OF_64_MB // 20, result


def test_the_console_script_sets_it_before_the_command_runs(monkeypatch) -> None:
    from wsiuda.cli import main

    calls: list[str] = []
    monkeypatch.setattr(main, "reuse_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(main, "collect_garbage_less_often", lambda: calls.append("gc"))
    monkeypatch.setattr(main, "cli", lambda: calls.append("command"))
    monkeypatch.setattr(main.os, "_exit", lambda code: calls.append(f"exit {code}"))
    main.main()
    assert calls == ["malloc", "gc", "command", "exit 0"]


def test_the_garbage_collector_runs_less_often_once_set() -> None:
    result = run_child(
        "import gc, json\n"
        "from wsiuda.allocator import GC_THRESHOLDS, collect_garbage_less_often\n"
        "collect_garbage_less_often()\n"
        "gc.collect()\n"
        "kept = [[] for _ in range(5000)]  # 700 < 5000 < 10000\n"
        "print(json.dumps({'thresholds': gc.get_threshold(), 'expected': GC_THRESHOLDS,\n"
        "                  'young': gc.get_count()[0]}))\n"
    )
    assert tuple(result["thresholds"]) == tuple(result["expected"])
    # The youngest generation still holds the new lists: it was not collected at 700.
    assert result["young"] > 4000, result


def test_crf_helpers_reuse_freed_memory() -> None:
    from wsiuda.pipelines import crf_helper

    try:
        helper = crf_helper._helper(1)
        assert helper is not None
        faults = helper.submit(_probe_in_helper).result()
    finally:
        crf_helper.shutdown_helper()
    assert faults < PAGES_OF_64_MB // 20


def _probe_in_helper() -> int:
    """Runs in a CRF helper: the probe above (here, at module level, so that the helper can import it)."""
    namespace: dict[str, object] = {}
    exec(FAULTS_OF_A_SECOND_ROUND, namespace)  # the same probe as the child processes run
    probe = namespace["faults_of_a_second_round"]
    assert callable(probe)
    return int(probe())


def test_local_cluster_workers_get_it_through_their_environment(monkeypatch, tmp_path) -> None:
    import distributed

    from wsiuda.allocator import ENVIRONMENT
    from wsiuda.pipelines.segment import SegmentConfig
    from wsiuda.pipelines.segment.cluster import cluster_client

    seen: dict[str, str] = {}

    class Stop(Exception):
        pass

    def recording_cluster(**kwargs: object) -> None:
        import dask

        seen.update(dask.config.get("distributed.nanny.pre-spawn-environ"))
        raise Stop

    monkeypatch.setattr(distributed, "LocalCluster", recording_cluster)
    config = SegmentConfig(inputs=("slide.svs",), output=str(tmp_path / "out"), workers=2)
    with pytest.raises(Stop), cluster_client(config):
        pass
    assert {name: seen.get(name) for name in ENVIRONMENT} == ENVIRONMENT


def test_local_cluster_worker_processes_collect_garbage_less_often(tmp_path) -> None:
    from distributed import Client

    from wsiuda.allocator import GC_THRESHOLDS
    from wsiuda.pipelines.segment import SegmentConfig
    from wsiuda.pipelines.segment.cluster import cluster_client

    config = SegmentConfig(inputs=("slide.svs",), output=str(tmp_path / "out"), workers=2)
    with cluster_client(config) as client:
        assert isinstance(client, Client)
        seen = client.run(_gc_thresholds)
        here = os.getpid()
        pids = client.run(os.getpid)
    assert len(seen) == 2 and here not in pids.values()
    assert all(tuple(thresholds) == GC_THRESHOLDS for thresholds in seen.values()), seen


def _gc_thresholds() -> tuple[int, int, int]:
    import gc

    return gc.get_threshold()
