"""One logging set-up for every command: ``--log-level`` and the same line format everywhere.

Commands call :func:`configure_logging` once, before any work, so that what the library logs
(resume points, calibration, adapters loaded, warnings) reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging

from steer.errors import InvalidInput

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level_flag(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """``--log-level`` (case-insensitive) on an argparse parser."""
    parser.add_argument("--log-level", default=default, type=str.upper, choices=LEVELS,
                        help=f"what the command logs to stderr (default: {default})")


def configure_logging(level: str = "INFO", field: str = "log_level") -> None:
    """Log records of ``level`` and above to stderr in :data:`FORMAT`; a later call changes the level."""
    name = str(level).upper()
    if name not in LEVELS:
        raise InvalidInput(field, f"must be one of {', '.join(LEVELS)}, got {level!r}")
    logging.basicConfig(level=name, format=FORMAT)
    logging.getLogger().setLevel(name)
