"""The ``artemis`` command line: :mod:`~artemis.cli.main` parses the arguments,
:mod:`~artemis.cli.workflows` runs prune, sweep, eval and export.

Example:
    >>> from artemis.cli import build_parser
    >>> build_parser().parse_args(["export", "in", "-o", "out"]).command
    'export'
"""

from artemis.cli.main import EXIT_USER_ERROR, OVERRIDES, build_parser, main
from artemis.cli.workflows import run_eval, run_export, run_prune, run_sweep

__all__ = ["main", "build_parser", "run_prune", "run_sweep", "run_eval", "run_export", "OVERRIDES", "EXIT_USER_ERROR"]
