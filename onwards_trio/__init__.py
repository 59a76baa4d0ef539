"""onwards_trio: a Trio-native, OpenAI-compatible LLM gateway.

Everything public is re-exported here (explicit ``X as X``, so type checkers treat the names as
public); the implementation lives in private modules, one per concern (docs/architecture.md).
"""

from typing import TYPE_CHECKING

from ._app import Gateway as Gateway
from ._app import ServeInfo as ServeInfo
from ._config import Config as Config
from ._config import load_config as load_config
from ._config import parse_config as parse_config
from ._errors import ConfigError as ConfigError
from ._errors import HTTPError as HTTPError
from ._errors import OnwardsError as OnwardsError
from ._events import ChannelSink as ChannelSink
from ._events import EventSink as EventSink
from ._events import LoopEvent as LoopEvent
from ._events import LoopEventKind as LoopEventKind
from ._events import open_response_stream as open_response_stream
from ._logging import RedactionFilter as RedactionFilter
from ._logging import RequestRecord as RequestRecord
from ._logging import configure_logging as configure_logging
from ._loop import DisconnectPolicy as DisconnectPolicy
from ._loop import LoopConfig as LoopConfig
from ._loop import LoopError as LoopError
from ._loop import LoopErrorKind as LoopErrorKind
from ._loop import run_response_loop as run_response_loop
from ._metrics import Metrics as Metrics
from ._metrics import install_metrics as install_metrics
from ._metrics import metrics_app as metrics_app
from ._metrics import serve_metrics as serve_metrics
from ._model import HttpModelTransport as HttpModelTransport
from ._model import ModelResponse as ModelResponse
from ._model import ModelTransport as ModelTransport
from ._oresp_input import ResponsesRequest as ResponsesRequest
from ._proxy import FilterContext as FilterContext
from ._proxy import FilterFactory as FilterFactory
from ._proxy import ProxyModelTransport as ProxyModelTransport
from ._proxy import ProxyRequest as ProxyRequest
from ._proxy import ResponseFilter as ResponseFilter
from ._proxy import UpstreamReply as UpstreamReply
from ._reload import ConfigWatcher as ConfigWatcher
from ._reload import GracefulShutdown as GracefulShutdown
from ._response_store import MemoryResponseStore as MemoryResponseStore
from ._response_store import ResponseStore as ResponseStore
from ._response_store import SqliteResponseStore as SqliteResponseStore
from ._response_store import StoredEvent as StoredEvent
from ._response_store import StoredResponse as StoredResponse
from ._responses_api import ResponsesService as ResponsesService
from ._sanitize import StreamSanitizer as StreamSanitizer
from ._steps import AppendSteps as AppendSteps
from ._steps import ChainStep as ChainStep
from ._steps import Complete as Complete
from ._steps import Fail as Fail
from ._steps import MultiStepStore as MultiStepStore
from ._steps import NextAction as NextAction
from ._steps import RecordedStep as RecordedStep
from ._steps import ResponseRecord as ResponseRecord
from ._steps import ResponseStatus as ResponseStatus
from ._steps import StepDescriptor as StepDescriptor
from ._steps import StepKind as StepKind
from ._steps import StepState as StepState
from ._steps import StoreError as StoreError
from ._steps import StoreErrorKind as StoreErrorKind
from ._store_memory import MemoryStore as MemoryStore
from ._store_sqlite import SqliteStore as SqliteStore
from ._strict import response_filter as response_filter
from ._strict_schemas import SchemaError as SchemaError
from ._targets import Targets as Targets
from ._tools import NoOpToolExecutor as NoOpToolExecutor
from ._tools import RequestContext as RequestContext
from ._tools import ToolError as ToolError
from ._tools import ToolErrorKind as ToolErrorKind
from ._tools import ToolExecutor as ToolExecutor
from ._tools import ToolKind as ToolKind
from ._tools import ToolSchema as ToolSchema
from ._tools_config import AgentSpec as AgentSpec
from ._tools_config import ConfigToolExecutor as ConfigToolExecutor
from ._transition import ScopeView as ScopeView
from ._transition import Transition as Transition
from ._transition import open_responses_transition as open_responses_transition

__version__ = "0.1.0"

if TYPE_CHECKING:  # static types for the lazily imported names below
    from ._limits_redis import SharedLimits as SharedLimits
    from ._store_postgres import PostgresDatabase as PostgresDatabase
    from ._store_postgres import PostgresResponseStore as PostgresResponseStore
    from ._store_postgres import PostgresStore as PostgresStore

# Backends with optional dependencies (psycopg for PostgreSQL, coredis for Redis) are imported
# on first use, so `import onwards_trio` never requires them.
_OPTIONAL = {
    "PostgresDatabase": "._store_postgres",
    "PostgresResponseStore": "._store_postgres",
    "PostgresStore": "._store_postgres",
    "SharedLimits": "._limits_redis",
}


def __getattr__(name: str) -> object:
    module = _OPTIONAL.get(name)
    if module is None:
        raise AttributeError(f"module 'onwards_trio' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "AgentSpec",
    "AppendSteps",
    "ChainStep",
    "ChannelSink",
    "Complete",
    "Config",
    "ConfigError",
    "ConfigToolExecutor",
    "ConfigWatcher",
    "DisconnectPolicy",
    "EventSink",
    "Fail",
    "FilterContext",
    "FilterFactory",
    "Gateway",
    "GracefulShutdown",
    "HTTPError",
    "HttpModelTransport",
    "LoopConfig",
    "LoopError",
    "LoopErrorKind",
    "LoopEvent",
    "LoopEventKind",
    "MemoryResponseStore",
    "MemoryStore",
    "Metrics",
    "ModelResponse",
    "ModelTransport",
    "MultiStepStore",
    "NextAction",
    "NoOpToolExecutor",
    "OnwardsError",
    "PostgresDatabase",
    "PostgresResponseStore",
    "PostgresStore",
    "ProxyModelTransport",
    "ProxyRequest",
    "RecordedStep",
    "RedactionFilter",
    "RequestContext",
    "RequestRecord",
    "ResponseFilter",
    "ResponseRecord",
    "ResponseStatus",
    "ResponseStore",
    "ResponsesRequest",
    "ResponsesService",
    "SchemaError",
    "ScopeView",
    "ServeInfo",
    "SharedLimits",
    "SqliteResponseStore",
    "SqliteStore",
    "StepDescriptor",
    "StepKind",
    "StepState",
    "StoreError",
    "StoreErrorKind",
    "StoredEvent",
    "StoredResponse",
    "StreamSanitizer",
    "Targets",
    "ToolError",
    "ToolErrorKind",
    "ToolExecutor",
    "ToolKind",
    "ToolSchema",
    "Transition",
    "UpstreamReply",
    "configure_logging",
    "install_metrics",
    "load_config",
    "metrics_app",
    "open_response_stream",
    "open_responses_transition",
    "parse_config",
    "response_filter",
    "run_response_loop",
    "serve_metrics",
]
