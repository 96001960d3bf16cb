"""``python -m latentkit.lab`` is the ``latentkit-lab`` command."""

import sys

from latentkit.lab.cli import main

sys.exit(main())
