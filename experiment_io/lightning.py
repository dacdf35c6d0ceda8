"""Lightning's checkpoint IO and exact resume (the ``lightning`` extra).

This name is kept for scripts that import it; the module itself is
:mod:`experiment_io.frontends.lightning`, and this name is that very module (so that an
attribute set on one is set on the other).
"""
import sys

from experiment_io.frontends import lightning as _module

sys.modules[__name__] = _module
