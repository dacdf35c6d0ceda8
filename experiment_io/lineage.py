"""Named checkpoint blocks as a cache for notebook re-runs.

This name is kept for scripts that import it; the module itself is
:mod:`experiment_io.frontends.lineage`, and this name is that very module (so that an
attribute set on one is set on the other).
"""
import sys

from experiment_io.frontends import lineage as _module

sys.modules[__name__] = _module
