"""Entry point for `python -m ztunnel`."""

import sys

from ztunnel.cli import main

sys.exit(main())
