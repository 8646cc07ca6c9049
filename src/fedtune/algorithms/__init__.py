"""Federated algorithms, one file each (server half + client half), registered by name."""

from fedtune.algorithms.base import ALGORITHMS, Algorithm, ClientUpdate, get_algorithm, register

# Importing the modules registers their algorithms.
from fedtune.algorithms import fedavg  # noqa: E402,F401

__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "get_algorithm", "register"]
