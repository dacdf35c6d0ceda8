"""The files of a run as objects: payloads (state to files), weightless structure files, the trust gate of
the structure file, and verified, stable reads.
"""
