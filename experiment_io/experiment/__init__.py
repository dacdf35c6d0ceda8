"""The experiment objects: training modules, controller, metric tracker, database, sampler, random streams,
and where each kind of tensor is placed.
"""
