"""The driver of ``wsiuda segment``: slides are prepared one by one and their batches handed to the runner."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from wsiuda.blocks import Block
from wsiuda.config import save_config
from wsiuda.errors import WsiudaError
from wsiuda.pipelines.crf_helper import shutdown_helper, start_helpers
from wsiuda.pipelines.segment.cluster import Runner, Task, crf_helpers_per_worker, runner, tasks_run_here
from wsiuda.pipelines.segment.config import SegmentConfig
from wsiuda.pipelines.segment.finalize import finalize_slide
from wsiuda.pipelines.segment.model import NetworkInfo, Predictor, model_path, resolve_model
from wsiuda.pipelines.segment.outputs import SlideOutputs, SlideResult, plan_outputs
from wsiuda.pipelines.segment.slides import PreparedSlide, prepare_slide
from wsiuda.pipelines.segment.sources import SourceSpec, close_shared_readers, expand_inputs
from wsiuda.pipelines.segment.tasks import AFTER_THE_CRF, process_blocks

log = logging.getLogger(__name__)


@dataclass
class SegmentReport:
    results: list[SlideResult] = field(default_factory=list)

    @property
    def failures(self) -> list[SlideResult]:
        return [result for result in self.results if result.error is not None]


def segment(
    config: SegmentConfig,
    *,
    predictor: Predictor | None = None,
    network: NetworkInfo | None = None,
    progress: bool = False,
) -> SegmentReport:
    """Segment every input of ``config``; a bad input is reported in the result and the batch goes on.

    ``predictor`` replaces the model (a picklable callable where workers are processes) and then needs
    ``network`` to describe it. Errors that stop the whole batch (bad model, unwritable output, bad
    options) raise a :class:`~wsiuda.errors.WsiudaError`.
    """
    if predictor is not None and network is None:
        raise ValueError("a custom predictor needs a NetworkInfo describing it")
    sources = expand_inputs(config.inputs, backend=config.backend, slide_mpp=config.slide_mpp)
    outputs, config_path = plan_outputs(config, sources)
    if predictor is None:
        model_path(config)  # fail fast, before a cluster starts
    try:
        helpers = crf_helpers_per_worker(config)
        if helpers and tasks_run_here(config):
            # First thing: the helpers import their libraries on the core that idles while this process
            # imports Dask and torch and loads the model, not beside the first tiles.
            start_helpers(helpers, preload=AFTER_THE_CRF)
        with runner(config) as run:
            if predictor is None:
                predictor, network = resolve_model(config, run)
            assert network is not None
            save_config(config, config_path, command="segment")
            return _segment(config, sources, outputs, predictor, network, run, progress=progress)
    finally:
        # Where tasks ran in this process; a worker process's helpers and readers end with it.
        shutdown_helper()
        close_shared_readers()


def _segment(
    config: SegmentConfig,
    sources: list[SourceSpec],
    outputs: list[SlideOutputs],
    predictor: Predictor,
    network: NetworkInfo,
    run: Runner,
    *,
    progress: bool,
) -> SegmentReport:
    working_mpp = config.mpp or network.mpp
    if abs(working_mpp / network.mpp - 1) > 0.1:
        log.warning("working at %.3g µm/px but the model was trained at %.3g µm/px", working_mpp, network.mpp)
    config.nuclei_factor(working_mpp)  # a --nuclei-mpp that does not fit stops the batch here, not per slide
    report = SegmentReport()
    from tqdm import tqdm

    bar = tqdm(
        total=0,
        unit="tile",
        desc="segment",
        disable=not progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )

    def tasks() -> Iterator[tuple[Task, tuple[PreparedSlide, list[Block]]]]:
        # Slides are prepared one by one as the runner asks for work, so the workers start on the first
        # slide while the next one's tissue is being found.
        for source, out in zip(sources, outputs, strict=True):
            try:
                prepared = prepare_slide(source, out, config, network, working_mpp)
            except WsiudaError as error:
                log.error("%s", _naming(source.path, error))
                report.results.append(SlideResult(source.path, error=str(error)))
                continue
            if isinstance(prepared, SlideResult):
                log.info("%s: already segmented into %s (pass --overwrite to redo)", source.path, out.geojson)
                report.results.append(prepared)
                continue
            prepared.remaining = len(prepared.batches)
            if prepared.remaining == 0:  # every tile was done by an earlier run
                report.results.append(_complete(prepared, config))
                continue
            bar.total = (bar.total or 0) + sum(len(blocks) for blocks, _ in prepared.batches)
            bar.refresh()
            for blocks, crops in prepared.batches:
                yield (prepared.job, blocks, crops, predictor), (prepared, blocks)

    with bar:
        for (slide, blocks), outcome in run(process_blocks, tasks()):
            bar.update(len(blocks))
            slide.remaining -= 1
            if isinstance(outcome, WsiudaError):
                slide.failed = slide.failed or str(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            if slide.remaining == 0:
                report.results.append(_complete(slide, config))
    return report


def _complete(slide: PreparedSlide, config: SegmentConfig) -> SlideResult:
    if slide.failed is not None:
        log.error("%s", _naming(slide.source.path, slide.failed))
        return SlideResult(slide.source.path, error=slide.failed)
    try:
        return finalize_slide(slide, config)
    except WsiudaError as error:
        log.error("%s", _naming(slide.source.path, error))
        return SlideResult(slide.source.path, error=str(error))


def _naming(path: str, error: object) -> str:
    """The error's message, led by the input's path unless it names it already."""
    message = str(error)
    return message if path in message else f"{path}: {message}"
