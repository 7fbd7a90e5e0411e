"""The distiller grammar's search space (issue 12): ``SPACE.yaml``, its size, its candidates and their formulas.

The pieces -- transforms, distances and the ``composed`` loss -- live with the losses (:mod:`kdkit.losses.transforms`,
:mod:`kdkit.losses.distances`, :mod:`kdkit.losses.composed`); this package sits above the recipe and build layers
because it reads a base recipe and probes its networks' taps.
"""

from kdkit.grammar.space import BoundSpace, Candidate, Core, SearchSpaceSpec, load_space, open_space, parse_space

__all__ = ["BoundSpace", "Candidate", "Core", "SearchSpaceSpec", "load_space", "open_space", "parse_space"]
