"""``python -m experiment_io``: the command line (see :mod:`experiment_io.frontends.cli`)."""
import sys

from experiment_io.frontends.cli import main

sys.exit(main())
