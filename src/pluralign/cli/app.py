"""The typer app of the ``pluralign`` command, and what its commands share: the ``--json``
flag, error exits, and how a CONFIG argument is found and read."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from pluralign import __version__
from pluralign._packaged import (
    packaged_config_names,
    packaged_configs_dir,
    resolve_package_paths,
)
from pluralign.cli.output import console, err_console

__all__ = [
    "JsonFlag",
    "app",
    "data_app",
    "default_config_path",
    "fail",
    "load_command_config",
    "resolve_config_path",
    "stdout_to_stderr",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pluralign: personalized, robust policies from heterogeneous human feedback.",
)
data_app = typer.Typer(no_args_is_help=True, help="Preference data files: check them.")

JsonFlag = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document of the results to stdout instead of tables "
        "(full precision; NaN as null); progress and log lines go to stderr.",
    ),
]


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``: whatever the job prints (progress bars, log lines) goes to stderr,
    so that stdout carries the JSON document alone."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit (code 2) to raise."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def default_config_path() -> Path:
    """The built-in quick LoCo-RLHF config that ``pluralign run`` uses without a CONFIG."""
    return packaged_configs_dir() / "quick.yaml"


def resolve_config_path(config: Path, announce: bool = True) -> Path:
    """The config file a command's CONFIG argument means: the path itself when it exists,
    else the packaged config it names (``loco``, ``loco.yaml`` or ``configs/loco.yaml``;
    with ``announce``, said on stderr). A ConfigError names the packaged configs otherwise."""
    from pluralign.errors import ConfigError

    if config.exists() or config.is_symlink():
        return config
    names = packaged_config_names()
    parts = config.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        stem = parts[-1].removesuffix(".yaml")
        if stem in names:
            path = packaged_configs_dir() / f"{stem}.yaml"
            if announce:
                err_console.print(
                    f"using packaged config {stem} ({path})",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            return path
    raise ConfigError(
        f"{config}: config file not found, and not the name of a packaged config; "
        f"packaged configs: {', '.join(names)} (e.g. `pluralign run loco`)"
    )


def load_command_config(
    config: Path, overrides: list[str] | None = None, announce: bool = True
) -> tuple[Path, dict[str, Any]]:
    """``(file, raw config)`` of a command's CONFIG argument: the file
    (:func:`resolve_config_path`) read, ``--set`` overrides applied, ``package:`` paths
    resolved (:func:`~pluralign._packaged.resolve_package_paths`)."""
    from pluralign.configfile import load_config

    path = resolve_config_path(config, announce=announce)
    raw = load_config(path)
    if overrides:
        from pluralign.llm.job import apply_overrides

        raw = apply_overrides(raw, overrides)
    return path, resolve_package_paths(raw)


def _version(value: bool) -> None:
    if value:
        console.print(f"pluralign {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """pluralign command line."""
