"""The learned block gate: block-pooled attention of the frozen model, distilled into small per-layer projections.

`model` holds the gate itself (imported by the prefill estimator and the decode scorer), `observer` the recorder of
its training signal, `train` the `attnsparse gate` run.
"""

from attnsparse.gate.model import BlockGate, GateConfig, block_kl, pool_keys, pool_queries

__all__ = ["BlockGate", "GateConfig", "block_kl", "pool_keys", "pool_queries"]
