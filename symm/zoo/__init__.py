"""Model zoos: populations of trained networks, generated (``make_zoo``), stored and loaded (``load``).

Every zoo names its architectures by reference-model configs, so ``zoo.spec()`` is the Spec that aligners, laws
and metanetworks read.
"""

from .make import ARCHS, ZooPlan, make_zoo
from .manifest import FORMAT_VERSION
from .small_cnn import load_small_cnn_zoo, standard_split
from .space import Run, SearchSpace, draw_run
from .store import load
from .table import Table, split_by_run
from .zoo import Zoo

__all__ = ["ARCHS", "FORMAT_VERSION", "Run", "SearchSpace", "Table", "Zoo", "ZooPlan", "draw_run", "load", "load_small_cnn_zoo", "make_zoo", "split_by_run", "standard_split"]
