"""``python -m latentkit`` is the ``latentkit`` command."""

import sys

from latentkit.cli import main

sys.exit(main())
