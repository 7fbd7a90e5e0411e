"""``python -m kdkit`` (and ``torchrun -m kdkit run RECIPE``)."""

import sys

from kdkit.cli import main

sys.exit(main())
