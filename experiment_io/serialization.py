"""The loaders: ``load_checkpoint``, ``load_checkpoint_from_cwd``, ``load_model_from_cwd``.

This name is kept for scripts that import it; the module itself is
:mod:`experiment_io.loading.loaders`, and this name is that very module (so that an
attribute set on one is set on the other).
"""
import sys

from experiment_io.loading import loaders as _module

sys.modules[__name__] = _module
