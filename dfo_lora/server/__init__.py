"""The evaluation server: frozen model + tokenized splits; scores populations of z."""

from dfo_lora.server.batching import Bucket, make_buckets, plan_groups
from dfo_lora.server.losses import LOSSES, per_example_loss
from dfo_lora.server.protocol import SearchServer
from dfo_lora.server.server import EvaluationServer, ServerOptions

__all__ = [
    "LOSSES",
    "Bucket",
    "EvaluationServer",
    "SearchServer",
    "ServerOptions",
    "make_buckets",
    "per_example_loss",
    "plan_groups",
]
