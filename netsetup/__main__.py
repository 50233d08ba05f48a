"""Entry point for `python -m netsetup`: capture preflight and sandbox housekeeping."""

import sys

from netsetup.cli import main

sys.exit(main())
