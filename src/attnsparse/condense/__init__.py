"""Condensation fine-tuning: LM loss + λ · condensation loss through the attnsparse backend (see docs/condense.md)."""

from attnsparse.condense.config import PRESETS, CondenseConfig, preset_config
from attnsparse.condense.run import CondenseResult, condense

__all__ = ["PRESETS", "CondenseConfig", "CondenseResult", "condense", "preset_config"]
