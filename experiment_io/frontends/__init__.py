"""Front ends on the layers below: your own loop, Lightning, hippynn runs, the notebook lineage cache and
the command line.
"""
