"""``python -m generator``: see generator.cli."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line with ``sys.argv`` and return the exit status."""
    from generator.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
