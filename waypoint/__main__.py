"""Entry point for `python -m waypoint`."""

import sys

from waypoint.cli import main

sys.exit(main())
