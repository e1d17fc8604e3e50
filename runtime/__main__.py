"""``python -m runtime``: the same as the ``zeta-agent`` console script."""

import sys

from runtime.ops.cli import main

sys.exit(main())
