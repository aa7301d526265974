"""The installed console script and the command group."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from wsiuda import __version__
from wsiuda.cli.main import COMMANDS, cli


def test_console_script_is_installed_and_reports_version() -> None:
    script = Path(sys.executable).parent / "wsiuda"
    assert script.exists() or shutil.which("wsiuda"), "the wsiuda console script is not installed"
    result = subprocess.run(
        [str(script) if script.exists() else "wsiuda", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_console_script_exit_codes_and_flushed_output(tmp_path: Path) -> None:
    # The script leaves by os._exit after the command: what it printed must still arrive, with the code.
    script = Path(sys.executable).parent / "wsiuda"
    command = str(script) if script.exists() else "wsiuda"
    listing = subprocess.run([command, "--help"], capture_output=True, text=True)
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in COMMANDS)
    missing = tmp_path / "missing.svs"
    failed = subprocess.run(
        [command, "segment", str(missing), "-o", str(tmp_path / "n.geojson")], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert f"Error: {missing}: no such file" in failed.stderr
    wrong = subprocess.run([command, "segment", "--no-such-option"], capture_output=True, text=True)
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [
        "Error: No such option '--no-such-option'; see `wsiuda segment --help`."
    ]


def test_a_bad_option_value_or_command_is_one_line_pointing_to_help() -> None:
    cases = {
        ("segment", "slide.svs", "--tile", "0"): "Invalid value for '--tile'",
        ("tile", "slide.svs", "--workers", "0"): "Invalid value for '--workers'",
        ("evaluate", "--data", "folder", "--precision", "int4"): "Invalid value for '--precision'",
        ("segment",): "Missing argument",
        ("segmnt",): "No such command 'segmnt'",
    }
    for arguments, message in cases.items():
        result = CliRunner().invoke(cli, list(arguments))
        assert result.exit_code == 2, arguments
        (line,) = result.output.splitlines()
        command = "wsiuda" if arguments[0] == "segmnt" else f"wsiuda {arguments[0]}"
        assert line.startswith(f"Error: {message}") and line.endswith(f"; see `{command} --help`."), line


def test_no_top_level_cli_or_pipelines_package_is_installed(tmp_path: Path) -> None:
    """As the installed package is seen from outside the source tree (which has cli/ and pipelines/)."""
    import os

    probe = (
        "import importlib.util, wsiuda.cli, wsiuda.pipelines; "
        "print([importlib.util.find_spec(name) is None for name in ('cli', 'pipelines')])"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    found = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[True, True]", "a top-level cli or pipelines package is installed"


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_every_command_module_loads_and_has_help() -> None:
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert "Usage" in result.output


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(monkeypatch, tmp_path: Path) -> None:
    import wsiuda.pipelines.segment as pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "segment", interrupted)
    result = CliRunner().invoke(cli, ["segment", "slide.svs", "-o", str(tmp_path / "n.geojson")])
    assert result.exit_code == 130
    expected = "Interrupted; finished tiles are kept: run the same command again to go on."
    assert result.output.strip() == expected


def test_every_command_says_what_an_interruption_keeps() -> None:
    from wsiuda.cli.main import ON_INTERRUPT

    assert set(ON_INTERRUPT) == set(COMMANDS)
