"""The continual-learning runner (issue 3): task sequences, methods side by side, metrics, plots,
checkpoints with exact resume, and adversarial sequence mining. Entry points: ``run`` and ``mine``."""
from .methods import Method, StageContext, available, get, register
from .profiles import RunConfig, make_config
from .run import run

__all__ = ["Method", "StageContext", "available", "get", "register", "RunConfig", "make_config", "run"]
