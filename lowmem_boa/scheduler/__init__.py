"""Streaming scheduler: plan, ledger, lazy weights, activation store; the only code that moves
tensors between disk, host and the compute device."""

from .ledger import BudgetExceeded, Ledger, fmt_bytes, parse_size, tensor_bytes
from .loader import (CheckpointReader, ModelSourceError, build_skeleton, load_config, open_checkpoint,
                     resolve_model_dir)
from .planner import Dims, Plan, PlanError, PlanInputs, make_plan
from .scheduler import Scheduler
from .store import ActivationStore

__all__ = ["ActivationStore", "BudgetExceeded", "CheckpointReader", "Dims", "Ledger", "ModelSourceError", "Plan",
           "PlanError", "PlanInputs", "Scheduler", "build_skeleton", "fmt_bytes", "load_config", "make_plan",
           "open_checkpoint", "parse_size", "resolve_model_dir", "tensor_bytes"]
