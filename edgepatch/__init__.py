"""edgepatch: fast, exact edge patching and circuit discovery for transformer language models.

>>> import edgepatch as ep
>>> model = ep.random_model("tiny")
>>> ep.build_graph(model)
Graph(random-tiny, 11 src x 27 dest, 110 edges)
"""

from edgepatch.errors import EdgepatchError, UnknownNameError
from edgepatch.graph import Graph, build_graph
from edgepatch.models import random_model
from edgepatch.patching import Ablation, mean_activations, patch, source_activations, zero_ablation

__version__ = "0.1.0"
