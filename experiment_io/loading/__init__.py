"""The loaders of the public API: a run directory back to objects, on any device.
"""
