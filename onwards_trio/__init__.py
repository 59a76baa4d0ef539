"""onwards_trio: a Trio-native, OpenAI-compatible LLM gateway.

Public names are re-exported here; the implementation lives in private modules.
"""

from ._app import Gateway as Gateway
from ._app import ServeInfo as ServeInfo
from ._config import Config as Config
from ._config import load_config as load_config
from ._config import parse_config as parse_config
from ._errors import ConfigError as ConfigError
from ._errors import HTTPError as HTTPError
from ._errors import OnwardsError as OnwardsError
from ._proxy import FilterContext as FilterContext
from ._proxy import ProxyRequest as ProxyRequest
from ._proxy import ResponseFilter as ResponseFilter
from ._proxy import UpstreamReply as UpstreamReply
from ._targets import Targets as Targets

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "FilterContext",
    "Gateway",
    "HTTPError",
    "OnwardsError",
    "ProxyRequest",
    "ResponseFilter",
    "ServeInfo",
    "Targets",
    "UpstreamReply",
    "load_config",
    "parse_config",
]
