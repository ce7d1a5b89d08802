"""The continual-learning application (SPEC §2): task sequences, methods side by side, metrics, plots,
checkpoints with exact resume, and adversarial sequence mining. Entry points: ``run``, ``mine`` and the
``slice-kernels`` command line (``runner.cli``). It imports the library; the library never imports it."""

from .methods import Method, StageContext, available, get, register
from .profiles import RunConfig, make_config
from .run import run

__all__ = ["Method", "StageContext", "available", "get", "register", "RunConfig", "make_config", "run"]
