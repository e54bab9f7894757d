"""Cluster-free core of expertmesh: configs, the MoE model, data, checkpoints, placement, tracking.

Nothing in this package imports Ray.
"""
