"""``python -m ntk_ray ...``: the ``ntk-ray`` command (same parser, same exit status)."""

import sys

from ntk_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
