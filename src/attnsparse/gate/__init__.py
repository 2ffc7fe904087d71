"""The learned block gate: block-pooled attention of the frozen model, distilled into small per-layer projections."""

from attnsparse.gate.model import BlockGate, GateConfig, block_kl, pool_keys, pool_queries
from attnsparse.gate.observer import BlockPoolRecorder, PooledLayer

__all__ = ["BlockGate", "BlockPoolRecorder", "GateConfig", "PooledLayer", "block_kl", "pool_keys", "pool_queries"]
