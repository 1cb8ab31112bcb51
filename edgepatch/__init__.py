"""edgepatch: fast, exact edge patching and circuit discovery for transformer language models.

>>> import edgepatch as ep
>>> model = ep.random_model("tiny")
>>> ep.build_graph(model)
Graph(random-tiny, 11 src x 27 dest, 110 edges)

Everything is importable from the top level; heavy optional parts (plots) import plotly lazily.
"""

from edgepatch import io, metrics, planted, tasks
from edgepatch.acdc import acdc
from edgepatch.attribution import attribute, eap, eap_ig, exact_patching
from edgepatch.baselines import activation_magnitude, random_scores
from edgepatch.learned import learn_masks
from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError, UnknownNameError
from edgepatch.graph import Graph, build_graph, prune_circuit
from edgepatch.loading import load_model
from edgepatch.masks import EdgeMasks, make_mask_fn, mask_fn, train_masks
from edgepatch.metrics import get_metric, normalized_faithfulness
from edgepatch.models import random_model
from edgepatch.patching import Ablation, mean_activations, patch, release_buffers, source_activations, zero_ablation
from edgepatch.scores import EdgeScores
from edgepatch.evaluation import circuit_recovery, roc
from edgepatch.planted import planted_model, verify_planting
from edgepatch.plots import plot_circuit, plot_faithfulness, plot_roc, save_figure
from edgepatch.sweep import SweepResult, edge_counts, evaluate_circuit, sweep
from edgepatch.weight_masks import apply_subnetwork, sweep_weight_sparsity, train_weight_masks, weight_masks

__version__ = "0.1.0"
