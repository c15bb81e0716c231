"""failover: primary/fallback failover for PostgreSQL, MongoDB and Redis.

Public names only; everything else lives in private modules.
"""

from ._urls import redact_url
from .core.endpoint import Endpoint, ProbeResult, Role
from .core.events import (
    BreakerTripped,
    EndpointHealthChanged,
    Event,
    FailbackCompleted,
    FailbackStarted,
    FailoverStarted,
    OperationRetried,
    ProbeCompleted,
    StateChanged,
    StoreRecovered,
    StoreUnavailable,
    SwitchState,
    TransitionCause,
)
from .core.store import last_served
from .databases import Databases
from .errors import (
    ClosedError,
    ConfigurationError,
    FailoverError,
    NoEndpointAvailable,
    NotRoutable,
    OperationError,
    OperationTimeout,
    OutcomeUnknown,
    StoreNotConfigured,
    TransactionRolledBack,
)
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BreakerTripped",
    "ClosedError",
    "ConfigurationError",
    "Databases",
    "Endpoint",
    "EndpointHealthChanged",
    "Event",
    "FailbackCompleted",
    "FailbackStarted",
    "FailoverError",
    "FailoverStarted",
    "NoEndpointAvailable",
    "NotRoutable",
    "OperationError",
    "OperationRetried",
    "OperationTimeout",
    "OutcomeUnknown",
    "ProbeCompleted",
    "ProbeResult",
    "Role",
    "Settings",
    "StateChanged",
    "StoreNotConfigured",
    "StoreRecovered",
    "StoreUnavailable",
    "SwitchState",
    "TransactionRolledBack",
    "TransitionCause",
    "last_served",
    "redact_url",
]
