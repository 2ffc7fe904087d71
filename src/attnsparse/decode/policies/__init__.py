"""Decode policies, one file each, registered by name in `POLICIES`."""

# registration order is the order help and error messages list the policies in
# isort: off
from attnsparse.decode.policies import dense, topk, block, streaming  # noqa: F401
# isort: on

from attnsparse.decode.policies.base import POLICIES, POLICY_TYPES, HeadPolicy, policy_from_dict, register_policy
from attnsparse.decode.policies.block import BlockPolicy
from attnsparse.decode.policies.dense import DensePolicy
from attnsparse.decode.policies.streaming import StreamingPolicy
from attnsparse.decode.policies.topk import TopkPolicy

__all__ = ["POLICIES", "POLICY_TYPES", "BlockPolicy", "DensePolicy", "HeadPolicy", "StreamingPolicy", "TopkPolicy",
           "policy_from_dict", "register_policy"]
