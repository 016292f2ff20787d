"""``python -m artemis.cli`` (and ``torchrun -m artemis.cli``) runs the ``artemis`` command.

Example (the exit status of ``python -m artemis.cli sweep --sparsities 0.3,1.5``: a bad
level is a user error, reported on stderr before anything is loaded):
    >>> from artemis.cli.__main__ import main
    >>> main(["sweep", "--sparsities", "0.3,1.5", "-q"])
    2
"""

import sys

from artemis.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
