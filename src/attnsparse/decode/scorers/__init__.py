"""Block scorers for block top-k decoding, one file each, registered by name in `SCORERS`."""

# registration order is the order help and error messages list the scorers in
# isort: off
from attnsparse.decode.scorers import mean, bound, channels, gate  # noqa: F401
# isort: on

from attnsparse.decode.scorers.base import (
    SCORER_TYPES,
    SCORERS,
    BlockScorer,
    parse_scorer,
    register_scorer,
    scorer_from_fields,
)
from attnsparse.decode.scorers.bound import BoundScore
from attnsparse.decode.scorers.channels import ChannelScore
from attnsparse.decode.scorers.gate import GateScore
from attnsparse.decode.scorers.mean import MeanScore

__all__ = ["SCORERS", "SCORER_TYPES", "BlockScorer", "BoundScore", "ChannelScore", "GateScore", "MeanScore", "parse_scorer",
           "register_scorer", "scorer_from_fields"]
