"""Storage: the files of a run written atomically and committed as generations, read back verified.

:mod:`experiment_io.storage.interface` is the one interface through which the
files of a run are written, committed, read, listed, removed and locked.
"""
