"""``python -m lab``: the same as the ``zeta-lab`` console script."""

import sys

from lab.cli import main

sys.exit(main())
