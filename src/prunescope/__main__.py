"""``python -m prunescope ...`` is the ``prunescope`` command (what ``torchrun -m prunescope`` runs)."""

import sys

from prunescope.cli import main

sys.exit(main())
