"""``python -m growops ...``: see ``growops.cli``."""

import sys

from .cli import main

sys.exit(main())
