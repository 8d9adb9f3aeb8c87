"""``python -m launch.cli``: the same entry point as the ``dimsum`` console script."""

import sys

from launch.cli import main

sys.exit(main())
