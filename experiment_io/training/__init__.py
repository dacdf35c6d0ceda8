"""The training loop and its policies: when to save and what to keep, preemption, distribution over
ranks, checkpointing, background writes, progress and plots.
"""
