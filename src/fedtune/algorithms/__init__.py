"""Federated algorithms, one file each (server half + client half), registered by name.

The interface is :class:`~fedtune.algorithms.base.Algorithm`; docs/architecture.md explains it and
walks through adding an algorithm.
"""

import importlib
import pkgutil

from fedtune.algorithms.base import (ADAPTER, ALGORITHMS, GLOBAL, Algorithm, ClientResult, Group, Instruction, Options,
                                     RoundContext, Setup, TensorSpec, Update, algorithm_class, build_algorithm,
                                     get_algorithm, parse_options, register, resolved_name, spec_of, weight)

# Importing the modules registers their algorithms (one file each; adding one is adding a file).
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ADAPTER", "ALGORITHMS", "GLOBAL", "Algorithm", "ClientResult", "Group", "Instruction", "Options",
           "RoundContext", "Setup", "TensorSpec", "Update", "algorithm_class", "build_algorithm", "get_algorithm",
           "parse_options", "register", "resolved_name", "spec_of", "weight"]
