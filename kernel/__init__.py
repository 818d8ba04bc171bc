"""The edgebus kernel: supervisor, bus router and capability checks.  Mechanism only."""

from protocols.runtime import EXIT_CONFIG, EXIT_ERROR, EXIT_GAVE_UP, EXIT_OK  # edgebus boot's exit statuses

from ._attest import ZERO_PCR, extend as extend_pcr
from ._caps import ACTIONS, CapabilitySet, parse_capability
from ._config import (
    Limits,
    LogsConfig,
    SupervisorConfig,
    BusConfig,
    OperatorConfig,
    ServiceConfig,
    SystemConfig,
    config_dir,
    default_config_text,
    load_config,
    parse_config,
)
from ._exceptions import BindError, CapabilityError, ConfigError, KernelError, SpawnError
from ._kernel import Kernel, default_dirs
from ._peers import Principal, RouterStatistics
from ._router import Router
from ._supervisor import State, Supervisor

__all__ = [
    "ACTIONS", "CapabilitySet", "parse_capability", "ZERO_PCR", "extend_pcr",
    "BusConfig", "OperatorConfig", "ServiceConfig", "SystemConfig", "SupervisorConfig", "LogsConfig", "Limits",
    "config_dir", "default_config_text", "load_config", "parse_config",
    "KernelError", "ConfigError", "CapabilityError", "BindError", "SpawnError",
    "Kernel", "default_dirs", "EXIT_OK", "EXIT_ERROR", "EXIT_GAVE_UP", "EXIT_CONFIG",
    "Router", "Principal", "RouterStatistics", "State", "Supervisor",
]
