"""Contraction-path planner for MPO chains and Tucker-2 convolutions.

explain(cores, rows)            what the torch backend runs for this layer, and the alternatives
options(recompute=..., ...)     planner switches (recompute in backward, force a plan kind, cache_dense)
recalibrate()                   re-measure this device's cost constants (cached under $TNK_CACHE_DIR)
choose_mpo_structure(...)       pick cores / modes / bonds for a ratio by predicted time and accuracy
"""

from .backends import NATIVE_MAX_ROWS, auto_mpo_backend
from .cache import OPTIONS, clear_plans, mpo_decision, options, plan_stats, set_options, tucker_decision
from .calibrate import Calibration, cache_dir, get_calibration, recalibrate, set_calibration
from .explain import explain, explain_tucker
from .mpo import PLAN_KINDS, MPODecision, MPOPlan
from .structure import MPOStructure, choose_mpo_structure, structure_candidates
from .tucker import TUCKER_KINDS, TuckerDecision

__all__ = [
    "NATIVE_MAX_ROWS",
    "OPTIONS",
    "PLAN_KINDS",
    "TUCKER_KINDS",
    "Calibration",
    "auto_mpo_backend",
    "MPODecision",
    "MPOPlan",
    "MPOStructure",
    "TuckerDecision",
    "cache_dir",
    "choose_mpo_structure",
    "clear_plans",
    "explain",
    "explain_tucker",
    "get_calibration",
    "mpo_decision",
    "options",
    "plan_stats",
    "recalibrate",
    "set_calibration",
    "set_options",
    "structure_candidates",
    "tucker_decision",
]
