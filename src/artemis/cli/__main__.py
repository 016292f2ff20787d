"""``python -m artemis.cli`` (and ``torchrun -m artemis.cli``) runs the ``artemis`` command."""

import sys

from artemis.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
