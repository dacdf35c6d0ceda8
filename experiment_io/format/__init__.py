"""The on-disk format: pure functions between state and bytes or plain dicts, and the stored names of classes.

Nothing in this layer touches the disk.
"""
