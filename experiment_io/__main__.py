"""``python -m experiment_io``: the command line (see :mod:`experiment_io.cli`)."""
import sys

from .cli import main

sys.exit(main())
