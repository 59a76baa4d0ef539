"""onwards_trio: a Trio-native, OpenAI-compatible LLM gateway.

Everything public is re-exported here (explicit ``X as X``, so type checkers treat the names as
public); the implementation lives in private sub-packages, one per layer, one module per concern
(docs/architecture.md).
"""

from typing import TYPE_CHECKING

from onwards_trio._app.gateway import Gateway as Gateway
from onwards_trio._app.gateway import ServeInfo as ServeInfo
from onwards_trio._config import Config as Config
from onwards_trio._config import load_config as load_config
from onwards_trio._config import parse_config as parse_config
from onwards_trio._errors import ConfigError as ConfigError
from onwards_trio._errors import HTTPError as HTTPError
from onwards_trio._errors import OnwardsError as OnwardsError
from onwards_trio._loop.events import ChannelSink as ChannelSink
from onwards_trio._loop.events import EventSink as EventSink
from onwards_trio._loop.events import LoopEvent as LoopEvent
from onwards_trio._loop.events import LoopEventKind as LoopEventKind
from onwards_trio._loop.model import HttpModelTransport as HttpModelTransport
from onwards_trio._loop.model import ModelResponse as ModelResponse
from onwards_trio._loop.model import ModelTransport as ModelTransport
from onwards_trio._loop.run import DisconnectPolicy as DisconnectPolicy
from onwards_trio._loop.run import LoopConfig as LoopConfig
from onwards_trio._loop.run import LoopError as LoopError
from onwards_trio._loop.run import LoopErrorKind as LoopErrorKind
from onwards_trio._loop.run import open_response_stream as open_response_stream
from onwards_trio._loop.run import run_response_loop as run_response_loop
from onwards_trio._loop.steps import AppendSteps as AppendSteps
from onwards_trio._loop.steps import ChainStep as ChainStep
from onwards_trio._loop.steps import Complete as Complete
from onwards_trio._loop.steps import Fail as Fail
from onwards_trio._loop.steps import MultiStepStore as MultiStepStore
from onwards_trio._loop.steps import NextAction as NextAction
from onwards_trio._loop.steps import RecordedStep as RecordedStep
from onwards_trio._loop.steps import ResponseRecord as ResponseRecord
from onwards_trio._loop.steps import ResponseStatus as ResponseStatus
from onwards_trio._loop.steps import StepDescriptor as StepDescriptor
from onwards_trio._loop.steps import StepKind as StepKind
from onwards_trio._loop.steps import StepState as StepState
from onwards_trio._loop.steps import StoreError as StoreError
from onwards_trio._loop.steps import StoreErrorKind as StoreErrorKind
from onwards_trio._loop.tools import NoOpToolExecutor as NoOpToolExecutor
from onwards_trio._loop.tools import RequestContext as RequestContext
from onwards_trio._loop.tools import ToolError as ToolError
from onwards_trio._loop.tools import ToolErrorKind as ToolErrorKind
from onwards_trio._loop.tools import ToolExecutor as ToolExecutor
from onwards_trio._loop.tools import ToolKind as ToolKind
from onwards_trio._loop.tools import ToolSchema as ToolSchema
from onwards_trio._loop.transition import ScopeView as ScopeView
from onwards_trio._loop.transition import Transition as Transition
from onwards_trio._loop.transition import open_responses_transition as open_responses_transition
from onwards_trio._ops.logs import RedactionFilter as RedactionFilter
from onwards_trio._ops.logs import RequestRecord as RequestRecord
from onwards_trio._ops.logs import configure_logging as configure_logging
from onwards_trio._ops.logs import protect as protect
from onwards_trio._ops.metrics import Metrics as Metrics
from onwards_trio._ops.metrics import install_metrics as install_metrics
from onwards_trio._ops.metrics import metrics_app as metrics_app
from onwards_trio._ops.metrics import serve_metrics as serve_metrics
from onwards_trio._ops.reload import ConfigWatcher as ConfigWatcher
from onwards_trio._ops.reload import GracefulShutdown as GracefulShutdown
from onwards_trio._ops.reload import config_secrets as config_secrets
from onwards_trio._proxy.pipeline import FilterContext as FilterContext
from onwards_trio._proxy.pipeline import FilterFactory as FilterFactory
from onwards_trio._proxy.pipeline import ProxyRequest as ProxyRequest
from onwards_trio._proxy.pipeline import ResponseFilter as ResponseFilter
from onwards_trio._proxy.pipeline import UpstreamReply as UpstreamReply
from onwards_trio._proxy.sanitize import StreamSanitizer as StreamSanitizer
from onwards_trio._proxy.strict import response_filter as response_filter
from onwards_trio._proxy.strict_schemas import SchemaError as SchemaError
from onwards_trio._proxy.targets import Targets as Targets
from onwards_trio._responses.config_tools import AgentSpec as AgentSpec
from onwards_trio._responses.config_tools import ConfigToolExecutor as ConfigToolExecutor
from onwards_trio._responses.input import ResponsesRequest as ResponsesRequest
from onwards_trio._responses.model_transport import ProxyModelTransport as ProxyModelTransport
from onwards_trio._responses.service import ResponsesService as ResponsesService
from onwards_trio._stores.base import ResponseStore as ResponseStore
from onwards_trio._stores.base import StoreBackend as StoreBackend
from onwards_trio._stores.base import StoredEvent as StoredEvent
from onwards_trio._stores.base import StoredResponse as StoredResponse
from onwards_trio._stores.memory import MemoryBackend as MemoryBackend
from onwards_trio._stores.memory import MemoryResponseStore as MemoryResponseStore
from onwards_trio._stores.memory import MemoryStore as MemoryStore
from onwards_trio._stores.sqlite import SqliteBackend as SqliteBackend
from onwards_trio._stores.sqlite import SqliteResponseStore as SqliteResponseStore
from onwards_trio._stores.sqlite import SqliteStore as SqliteStore

__version__ = "0.1.0"

if TYPE_CHECKING:  # static types for the lazily imported names below
    from onwards_trio._proxy.shared_limits import SharedLimits as SharedLimits
    from onwards_trio._stores.postgres import PostgresBackend as PostgresBackend
    from onwards_trio._stores.postgres import PostgresDatabase as PostgresDatabase
    from onwards_trio._stores.postgres import PostgresResponseStore as PostgresResponseStore
    from onwards_trio._stores.postgres import PostgresStore as PostgresStore

# Backends with optional dependencies (psycopg for PostgreSQL, coredis for Redis) are imported
# on first use, so `import onwards_trio` never requires them.
_OPTIONAL = {
    "PostgresBackend": "onwards_trio._stores.postgres",
    "PostgresDatabase": "onwards_trio._stores.postgres",
    "PostgresResponseStore": "onwards_trio._stores.postgres",
    "PostgresStore": "onwards_trio._stores.postgres",
    "SharedLimits": "onwards_trio._proxy.shared_limits",
}


def __getattr__(name: str) -> object:
    module = _OPTIONAL.get(name)
    if module is None:
        raise AttributeError(f"module 'onwards_trio' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    "MemoryBackend",
    "MemoryResponseStore",
    "MemoryStore",
    "Metrics",
    "ModelResponse",
    "ModelTransport",
    "MultiStepStore",
    "NextAction",
    "NoOpToolExecutor",
    "OnwardsError",
    "PostgresBackend",
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
    "SqliteBackend",
    "SqliteResponseStore",
    "SqliteStore",
    "StepDescriptor",
    "StepKind",
    "StepState",
    "StoreBackend",
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
    "config_secrets",
    "configure_logging",
    "install_metrics",
    "load_config",
    "metrics_app",
    "open_response_stream",
    "open_responses_transition",
    "parse_config",
    "protect",
    "response_filter",
    "run_response_loop",
    "serve_metrics",
]
