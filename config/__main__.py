"""Entry point for `python -m config`."""

import sys

from config.cli import main

sys.exit(main())
