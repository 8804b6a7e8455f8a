"""Beam's pipeline options for ``retrain extract``, checked, and the DirectRunner pinned to Beam's
Python runner."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from ...errors import ConfigError

DIRECT_RUNNER = "DirectRunner"


def pipeline_options(runner: str = DIRECT_RUNNER, workers: int | None = None, beam_args: Sequence[str] = ()):
    """Beam's PipelineOptions for ``runner`` and the extra ``beam_args``, refusing what Beam would
    silently drop (an unknown flag) or die on (a bad value), with one line each."""
    args = [str(a) for a in beam_args]
    for arg in args:
        if arg == "--runner" or arg.startswith("--runner="):
            raise ConfigError("give the runner as retrain's --runner option, before the --")
    direct = runner == DIRECT_RUNNER
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if not direct:
            raise ConfigError(f"--workers is for the DirectRunner; pass {runner}'s own worker options after --")
        if any(a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in args):
            raise ConfigError("--workers sets --direct_num_workers and --direct_running_mode: give one or the other")
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    options = PipelineOptions(args + [f"--runner={runner}"])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # argparse prints its whole usage before exiting
            known = options.get_all_options()
            every = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        message = next((line for line in reversed(stderr.getvalue().splitlines()) if "error:" in line), "bad option")
        raise ConfigError(f"Beam pipeline options: {message.split('error:', 1)[1].strip()}") from None
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise ConfigError(f"unknown Beam pipeline option --{unknown[0]} (see Beam's PipelineOptions for {runner})")
    if direct:
        mode = options.view_as(DirectOptions).direct_running_mode
        if mode == "in_memory" and (options.view_as(DirectOptions).direct_num_workers or 1) > 1:
            raise ConfigError("--direct_num_workers above 1 needs --direct_running_mode multi_processing (or --workers N)")
    return options


def pinned_runner(runner: str, options):
    """The DirectRunner pinned to Beam's Python FnApiRunner (never the downloaded Prism runner)."""
    if runner != DIRECT_RUNNER:
        return None  # Beam creates it from --runner
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # The provision info the DirectRunner gives its FnApiRunner: the workers see the pipeline options.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)
