"""``python -m volseg``: the same command line as the ``volseg`` script (what ``torchrun -m volseg``
launches)."""

import sys

from .cli import main

sys.exit(main())
