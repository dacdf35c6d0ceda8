"""Platform fast paths and the portable primitives below storage.

Everything here has one switch (:mod:`experiment_io.platform.switch`): with
``EXPERIMENT_IO_FAST_PATHS=0`` every fast path takes the portable way.
"""
