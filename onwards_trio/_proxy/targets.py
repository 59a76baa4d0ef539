"""The live routing table built from a :class:`~onwards_trio._config.Config`.

A :class:`Table` is immutable once built; :class:`Targets` holds the current one and swaps it in
a single assignment, so a request that started on the old table finishes on it, and no request
ever sees half a table. State that must outlive a swap is *adopted* by the new table:
in-flight counters always (they describe requests still running), rate-limit buckets when the
limit did not change (so a reload is no way around a limit).
"""

from __future__ import annotations

import decimal
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from onwards_trio._config import (
    MIN_MASKED_KEY_LENGTH,
    BudgetSpec,
    Config,
    Fallback,
    LabelBudgetSpec,
    PoolSpec,
    ProviderSpec,
    RateLimitSpec,
    RoutingRule,
    TokenLimitSpec,
    ToolSpec,
    load_token_counter,
)
from onwards_trio._proxy.auth import KeySet, configured_key_id, key_id
from onwards_trio._proxy.budgets import Budget, label_scope
from onwards_trio._proxy.limits import (
    ConcurrencyLimit,
    PromptCounter,
    TokenBucket,
    TokenLimit,
    key_scope,
)
from onwards_trio._proxy.pricing import Price, highest_price, price_for
from onwards_trio._proxy.reasoning import ReasoningMap

if TYPE_CHECKING:
    from onwards_trio._proxy.shared_limits import SharedLimits

__all__ = ["Pool", "Provider", "Table", "Targets"]


def _bucket(spec: RateLimitSpec | None, old: TokenBucket | None) -> TokenBucket | None:
    if spec is None:
        return None
    if old is not None and old.rate == spec.requests_per_second and old.burst == spec.capacity:
        return old
    return TokenBucket(spec.requests_per_second, spec.capacity)


def _token_limit(spec: TokenLimitSpec | None, old: TokenLimit | None) -> TokenLimit | None:
    """A token limit, adopted from the old table while unchanged (a reload is no way out)."""
    if spec is None:
        return None
    if old is not None and old.limit == spec.tokens and old.window == spec.window_secs:
        return old
    return TokenLimit(spec.tokens, spec.window_secs)


def _budget(spec: BudgetSpec, old: Budget | None) -> Budget:
    """A budget, adopted from the old table while unchanged (its spend carries over)."""
    amount = int(decimal.Decimal(repr(spec.amount)).scaleb(6))
    if old is not None and old.amount == amount and old.window == spec.window:
        return old
    return Budget(amount, spec.window)


def _headers(mapping: Mapping[str, str] | None) -> list[tuple[bytes, bytes]]:
    out = []
    for k, v in (mapping or {}).items():
        try:
            out.append((k.strip().lower().encode("ascii"), v.encode("latin-1")))
        except UnicodeEncodeError:
            continue  # an invalid header is skipped, as onwards does
    return out


@attrs.define(eq=False)
class Provider:
    """One upstream of a pool, with everything the hot path needs precomputed."""

    index: int
    spec: ProviderSpec
    scheme: bytes
    host: bytes
    port: int | None
    host_header: bytes
    base_path: bytes  # always ends with "/"
    prefix: bytes  # base path without slashes ("v1"), b"" for a root base
    auth_header: tuple[bytes, bytes] | None
    secret: bytes | None  # the upstream key, masked in relayed bodies (if long enough: see
    # MIN_MASKED_KEY_LENGTH)
    response_headers: list[tuple[bytes, bytes]]
    weight: int
    rate: TokenBucket | None
    concurrency: ConcurrencyLimit
    timeout: float | None
    model: bytes | None
    sanitize: bool
    trusted: bool
    adapter: bool
    anthropic: bool  # serves /v1/messages through the Chat translation
    reasoning: ReasoningMap | None  # how this upstream takes a reasoning effort
    price: Price | None = None  # what its responses cost (pricing.price_for); None: unknown
    tokens: TokenLimit | None = None  # this upstream's own token limit
    # request path -> upstream target (_proxy.pipeline), for the few paths clients use: the
    # join is made once per path, not per request (bounded: past it, paths are joined anew)
    targets: dict[bytes, bytes] = attrs.field(factory=dict, repr=False)

    @property
    def identity(self) -> tuple[str, str | None, str | None]:
        """Providers are the same across a reload when these match (onwards' rule)."""
        return (self.spec.url, self.spec.onwards_key, self.spec.onwards_model)

    @property
    def url(self) -> str:
        return self.spec.url


@attrs.define(eq=False)
class Pool:
    """One model alias: its providers and the policy around them."""

    alias: str
    spec: PoolSpec
    providers: list[Provider]
    keys: KeySet | None  # None: public
    rate: TokenBucket | None
    tokens: TokenLimit | None
    concurrency: ConcurrencyLimit | None
    fallback: Fallback | None
    strategy: str
    trusted: bool
    rules: list[RoutingRule]
    adapter: bool
    anthropic: bool
    tools: dict[str, ToolSpec]
    # The dearest price any provider may charge (what a budget reserves before one is chosen).
    price: Price | None = None
    provider_tokens: bool = False  # some provider has a token limit (usage must be read)
    provider_checks: bool = False  # some provider has a rate or token limit


@attrs.define(eq=False)
class Table:
    """An immutable snapshot of the routing table."""

    config: Config
    pools: dict[str, Pool]
    # Per-key state is keyed by the key's identity (auth.key_id: its sha256), never the key.
    key_rate: dict[str, TokenBucket]
    key_concurrency: dict[str, ConcurrencyLimit]
    key_labels: dict[str, dict[str, str]]
    key_tokens: dict[str, tuple[TokenLimit, TokenLimitSpec]]
    all_keys: KeySet
    protected: bool  # some key protects some pool: unknown aliases answer 401 to strangers
    # Limits shared with other replicas through Redis (None: in-process limits only). One
    # object for the gateway's lifetime, carried from table to table across reloads.
    shared: SharedLimits | None = None
    key_names: dict[str, str] = attrs.field(factory=dict)  # key id -> its definition's name
    # key id -> (scope, budget, spec) of its definition's budget and every label budget that
    # matches its labels (a label budget is one object shared by all its keys)
    key_budgets: dict[str, list[tuple[str, Budget, BudgetSpec]]] = attrs.field(factory=dict)
    # how admission sizes a prompt (config ``token_counter``; default: body bytes over four)
    prompt_counter: PromptCounter = attrs.field(factory=PromptCounter)

    @property
    def strict_mode(self) -> bool:
        return self.config.strict_mode

    def key_label(self, token: str | None) -> str:
        """How metrics and spans name a caller's key: its ``key_definitions`` name, ``"none"``
        without a key, ``"other"`` for a key with no definition. Never the key itself."""
        return self.key_label_of(key_id(token) if token is not None else None)

    def key_label_of(self, ident: str | None) -> str:
        """:meth:`key_label` of a key identity (:func:`~onwards_trio._proxy.auth.key_id`)."""
        if ident is None:
            return "none"
        return self.key_names.get(ident, "other")

    def visible_aliases(self, token: str | None) -> list[str]:
        """Aliases a caller may see in ``/v1/models``: public ones plus those its key opens."""
        return [
            alias
            for alias, pool in self.pools.items()
            if pool.keys is None or (token is not None and token in pool.keys)
        ]


def _split_url(url: str) -> tuple[bytes, bytes, int | None, bytes]:
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return parts.scheme.encode(), host.encode("idna"), parts.port, path.encode()


def _build_provider(
    index: int,
    spec: ProviderSpec,
    pool: PoolSpec,
    old: Provider | None,
) -> Provider:
    scheme, host, port, base_path = _split_url(spec.url)
    auth = None
    if spec.onwards_key is not None:
        name = (spec.upstream_auth_header_name or "Authorization").strip().lower()
        prefix = (
            spec.upstream_auth_header_prefix
            if spec.upstream_auth_header_prefix is not None
            else "Bearer "
        )
        auth = (name.encode("ascii"), (prefix + spec.onwards_key).encode("latin-1"))
    response_headers = dict(_headers(pool.response_headers))
    response_headers.update(_headers(spec.response_headers))  # provider wins
    limit = spec.concurrency_limit.max_concurrent_requests if spec.concurrency_limit else None
    concurrency = ConcurrencyLimit(limit, old.concurrency.counter if old else None)
    adapter_spec = spec.open_responses or pool.open_responses
    reasoning = spec.reasoning or pool.reasoning
    return Provider(
        index=index,
        spec=spec,
        scheme=scheme,
        host=host,
        port=port,
        host_header=host if port is None else host + b":%d" % port,
        base_path=base_path,
        prefix=base_path.strip(b"/"),
        auth_header=auth,
        secret=(
            spec.onwards_key.encode("latin-1")
            if spec.onwards_key is not None and len(spec.onwards_key) >= MIN_MASKED_KEY_LENGTH
            else None
        ),
        response_headers=list(response_headers.items()),
        weight=spec.weight,
        rate=_bucket(spec.rate_limit, old.rate if old else None),
        concurrency=concurrency,
        timeout=spec.request_timeout_secs,
        model=spec.onwards_model.encode() if spec.onwards_model is not None else None,
        sanitize=spec.sanitize_response or pool.sanitize_response,
        trusted=spec.trusted if spec.trusted is not None else pool.trusted,
        adapter=bool(adapter_spec and adapter_spec.adapter),
        anthropic=bool(spec.anthropic and spec.anthropic.adapter),
        reasoning=ReasoningMap(reasoning) if reasoning is not None else None,
        price=price_for(pool, spec),
        tokens=_token_limit(spec.token_limit, old.tokens if old else None),
    )


def build_table(
    config: Config, old: Table | None = None, shared: SharedLimits | None = None
) -> Table:
    """Build a table from a config, adopting counters and unchanged buckets from ``old``.

    ``shared`` (else ``old``'s) is carried over as is: the Redis connection belongs to the
    gateway, so a reload that edits ``shared_limits`` takes effect at the next start.
    """
    if shared is None and old is not None:
        shared = old.shared
    auth = config.auth
    global_keys = list(auth.global_keys) if auth else []
    definitions = dict(auth.key_definitions) if auth else {}
    global_ids = {configured_key_id(k) for k in global_keys}
    def_ids = {name: configured_key_id(d.key) for name, d in definitions.items()}
    every_key: set[str] = global_ids | set(def_ids.values())
    pools: dict[str, Pool] = {}
    protected = bool(global_keys)
    for alias, spec in config.targets.items():
        old_pool = old.pools.get(alias) if old else None
        old_providers = {p.identity: p for p in old_pool.providers} if old_pool else {}
        providers = []
        for i, pspec in enumerate(spec.providers):
            identity = (pspec.url, pspec.onwards_key, pspec.onwards_model)
            providers.append(_build_provider(i, pspec, spec, old_providers.get(identity)))
        keys: KeySet | None = None
        if spec.keys is not None or global_keys:
            # A key_definitions *name* listed in `keys` grants that definition's key (SPEC §2.1)
            # and only that: a guessable name must never itself be a credential.
            pool_keys = {
                def_ids[k] if k in def_ids else configured_key_id(k) for k in spec.keys or []
            }
            pool_keys |= global_ids
            every_key |= pool_keys
            keys = KeySet(pool_keys)
            protected = True
        limit = spec.concurrency_limit.max_concurrent_requests if spec.concurrency_limit else None
        concurrency = None
        if spec.concurrency_limit is not None:
            old_counter = (
                old_pool.concurrency.counter if old_pool and old_pool.concurrency else None
            )
            concurrency = ConcurrencyLimit(limit, old_counter)
        adapter = any(p.adapter for p in providers[:1]) or bool(
            spec.open_responses and spec.open_responses.adapter
        )
        tools = dict(config.tools)
        if spec.open_responses:
            tools.update(spec.open_responses.tools)
        for p in spec.providers[:1]:
            if p.open_responses:
                tools.update(p.open_responses.tools)
        pools[alias] = Pool(
            alias=alias,
            spec=spec,
            providers=providers,
            keys=keys,
            rate=_bucket(spec.rate_limit, old_pool.rate if old_pool else None),
            tokens=_token_limit(spec.token_limit, old_pool.tokens if old_pool else None),
            concurrency=concurrency,
            fallback=spec.fallback,
            strategy=spec.strategy,
            trusted=spec.trusted,
            rules=list(spec.routing_rules),
            adapter=adapter,
            anthropic=any(p.anthropic for p in providers[:1])
            or bool(spec.anthropic and spec.anthropic.adapter),
            tools=tools,
            price=highest_price(p.price for p in providers),
            provider_tokens=any(p.tokens is not None for p in providers),
            provider_checks=any(p.tokens is not None or p.rate is not None for p in providers),
        )
    key_rate: dict[str, TokenBucket] = {}
    key_concurrency: dict[str, ConcurrencyLimit] = {}
    key_labels: dict[str, dict[str, str]] = {}
    key_tokens: dict[str, tuple[TokenLimit, TokenLimitSpec]] = {}
    for name, d in definitions.items():
        ident = def_ids[name]
        bucket = _bucket(d.rate_limit, old.key_rate.get(ident) if old else None)
        if bucket is not None:
            key_rate[ident] = bucket
        if d.concurrency_limit is not None:
            old_limit = old.key_concurrency.get(ident) if old else None
            key_concurrency[ident] = ConcurrencyLimit(
                d.concurrency_limit.max_concurrent_requests,
                old_limit.counter if old_limit else None,
            )
        if d.labels:
            key_labels[ident] = dict(d.labels)
        if d.token_limit is not None:
            old_tokens = old.key_tokens.get(ident) if old else None
            tokens = _token_limit(d.token_limit, old_tokens[0] if old_tokens else None)
            assert tokens is not None
            key_tokens[ident] = (tokens, d.token_limit)
    key_names = {def_ids[name]: name for name in definitions}
    key_budgets = _key_budgets(config, def_ids, old)
    return Table(
        config=config,
        pools=pools,
        key_rate=key_rate,
        key_concurrency=key_concurrency,
        key_labels=key_labels,
        key_tokens=key_tokens,
        all_keys=KeySet(every_key),
        protected=protected,
        shared=shared,
        key_names=key_names,
        key_budgets=key_budgets,
        prompt_counter=PromptCounter(load_token_counter(config.token_counter), config.token_counter)
        if config.token_counter is not None
        else PromptCounter(),
    )


def _key_budgets(
    config: Config, def_ids: Mapping[str, str], old: Table | None
) -> dict[str, list[tuple[str, Budget, BudgetSpec]]]:
    """Each defined key's budgets: its own, then the label budgets its labels match."""
    if config.auth is None:
        return {}
    olds = {s: b for entries in old.key_budgets.values() for s, b, _ in entries} if old else {}
    labelled: list[tuple[str, Budget, LabelBudgetSpec]] = []
    for spec in config.auth.label_budgets:
        scope = label_scope(spec.match_labels)
        labelled.append((scope, _budget(spec, olds.get(scope)), spec))
    out: dict[str, list[tuple[str, Budget, BudgetSpec]]] = {}
    for name, d in config.auth.key_definitions.items():
        ident = def_ids[name]
        entries: list[tuple[str, Budget, BudgetSpec]] = []
        if d.budget is not None:
            scope = key_scope(ident)
            entries.append((scope, _budget(d.budget, olds.get(scope)), d.budget))
        for scope, budget, spec in labelled:
            if all(d.labels.get(k) == v for k, v in spec.match_labels.items()):
                entries.append((scope, budget, spec))
        if entries:
            out[ident] = entries
    return out


class Targets:
    """The live routing table. Read :attr:`table` once per request; :meth:`update` swaps it."""

    def __init__(self, config: Config) -> None:
        self.table = build_table(config)

    @property
    def config(self) -> Config:
        return self.table.config

    def update(self, config: Config) -> None:
        """Swap in a new config as a whole table (one assignment: atomic for Trio tasks)."""
        self.table = build_table(config, self.table)
