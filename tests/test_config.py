"""The config file: onwards' three target shapes, our fixes, and errors that name the path."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from onwards_trio import ConfigError, Targets, load_config, parse_config


def problems(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return info.value.problems


def test_single_target_shape_becomes_a_one_provider_pool() -> None:
    config = parse_config(
        {
            "targets": {
                "gpt-4": {"url": "https://api.openai.com/v1", "onwards_key": "sk", "keys": ["k"]}
            }
        }
    )
    pool = config.targets["gpt-4"]
    assert [p.url for p in pool.providers] == ["https://api.openai.com/v1"]
    assert pool.keys == ["k"] and pool.strategy == "weighted_random" and pool.fallback is None


def test_single_target_limits_are_provider_level() -> None:
    table = Targets(
        parse_config(
            {
                "targets": {
                    "m": {
                        "url": "http://x",
                        "rate_limit": {"requests_per_second": 5},
                        "concurrency_limit": {"max_concurrent_requests": 2},
                    }
                }
            }
        )
    ).table
    pool = table.pools["m"]
    assert pool.rate is None and pool.concurrency is None
    assert pool.providers[0].rate is not None and pool.providers[0].concurrency.limit == 2


def test_legacy_list_shape() -> None:
    config = parse_config(
        {"targets": {"m": [{"url": "http://a", "weight": 3, "keys": ["k"]}, {"url": "http://b"}]}}
    )
    pool = config.targets["m"]
    assert [p.weight for p in pool.providers] == [3, 1]
    assert pool.keys == ["k"]


def test_legacy_list_with_mixed_trust_is_rejected() -> None:
    found = problems(
        {"targets": {"m": [{"url": "http://a", "trusted": True}, {"url": "http://b"}]}}
    )
    assert any("same 'trusted' value" in p and "$.targets.m" in p for p in found)


def test_pool_shape_with_every_key() -> None:
    config = parse_config(
        {
            "targets": {
                "m": {
                    "providers": [
                        {
                            "url": "http://a/v1",
                            "onwards_key": "sk-provider",
                            "onwards_model": "real",
                            "weight": 2,
                            "upstream_auth_header_name": "X-Key",
                            "upstream_auth_header_prefix": "",
                            "response_headers": {"A": "1"},
                            "sanitize_response": True,
                            "request_timeout_secs": 30,
                            "trusted": True,
                            "open_responses": {"adapter": True},
                            "rate_limit": {"requests_per_second": 2.5, "burst_size": 4},
                            "concurrency_limit": {"max_concurrent_requests": 3},
                        }
                    ],
                    "keys": ["k1"],
                    "rate_limit": {"requests_per_second": 10},
                    "concurrency_limit": {"max_concurrent_requests": 5},
                    "response_headers": {"B": "2"},
                    "fallback": {
                        "enabled": True,
                        "on_status": [5, 429],
                        "on_rate_limit": True,
                        "with_replacement": True,
                        "max_attempts": 3,
                        "backoff": {
                            "initial_ms": 50,
                            "max_ms": 1000,
                            "factor": 2,
                            "jitter": "none",
                        },
                    },
                    "strategy": "priority",
                    "sanitize_response": False,
                    "trusted": False,
                    "routing_rules": [{"match_labels": {"a": "b"}, "action": {"type": "deny"}}],
                }
            },
            "auth": {"global_keys": ["g"], "key_definitions": {"d": {"key": "sk-d"}}},
            "strict_mode": False,
            "http_pool": {"max_idle_per_host": 10, "idle_timeout_secs": 30},
        }
    )
    pool = config.targets["m"]
    assert pool.strategy == "priority" and pool.fallback is not None
    assert pool.fallback.backoff is not None and pool.fallback.backoff.jitter == "none"
    assert pool.providers[0].rate_limit is not None
    assert pool.providers[0].rate_limit.requests_per_second == 2.5
    assert config.warnings == ()


def test_float_requests_per_second_is_accepted() -> None:
    config = parse_config(
        {"targets": {"m": {"url": "http://a", "rate_limit": {"requests_per_second": 0.5}}}}
    )
    limit = config.targets["m"].providers[0].rate_limit
    assert limit is not None and limit.requests_per_second == 0.5 and limit.capacity == 1


def test_auth_without_global_keys_is_valid() -> None:
    config = parse_config(
        {"targets": {"m": {"url": "http://a"}}, "auth": {"key_definitions": {"x": {"key": "k"}}}}
    )
    assert config.auth is not None and config.auth.global_keys == []


def test_unknown_keys_are_ignored_but_likely_typos_are_reported() -> None:
    config = parse_config(
        {
            "targets": {"m": {"url": "http://a", "future_option": 1, "onwards_kye": "x"}},
            "strict_mod": True,
            "something_else": {},
        }
    )
    assert any("'onwards_kye'" in w and "'onwards_key'" in w for w in config.warnings)
    assert any("'strict_mod'" in w for w in config.warnings)
    assert not any("future_option" in w or "something_else" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"targets": {"a": {"url": 3}}}, "expected a string, got a number @ $.targets.a.url"),
        (
            {
                "targets": {
                    "a": {"providers": [{"url": "http://x"}, {"url": "http://y", "weight": "2"}]}
                }
            },
            "@ $.targets.a.providers[1].weight",
        ),
        (
            {"targets": {"a": {"providers": [{"onwards_key": "k"}]}}},
            "@ $.targets.a.providers[0].url",
        ),
        (
            {"targets": {"a": {"url": "http://x", "rate_limit": {"requests_per_second": 0}}}},
            "requests_per_second must be > 0",
        ),
        ({"targets": {"a": {"url": "ftp://x"}}}, "url must start with http"),
        (
            {"targets": {"a": {"url": "http://x"}}, "auth": {"global_keys": "k"}},
            "$.auth.global_keys",
        ),
        (
            {"targets": {"a": {"providers": [{"url": "http://x"}], "strategy": "random"}}},
            "must be one of 'weighted_random', 'priority' @ $.targets.a.strategy",
        ),
        ({"targets": []}, "@ $.targets"),
        ({}, "required field missing @ $.targets"),
    ],
)
def test_errors_name_the_json_path(doc: Any, expected: str) -> None:
    assert any(expected in p for p in problems(doc)), problems(doc)


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"targets": {"a": {"url": 1}, "b": {"url": 2}}})
    assert len(found) == 2


def test_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_invalid_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(path)


def test_key_definition_names_in_keys_grant_the_key() -> None:
    table = Targets(
        parse_config(
            {
                "targets": {"m": {"url": "http://a", "keys": ["premium"]}},
                "auth": {"key_definitions": {"premium": {"key": "sk-premium-123"}}},
            }
        )
    ).table
    keys = table.pools["m"].keys
    assert keys is not None and "sk-premium-123" in keys
    assert "premium" not in keys  # the name is not itself a key


@pytest.mark.parametrize("url", ["…", "ftp://tools.local/x", "http://"])
def test_a_tool_url_must_be_an_absolute_http_url(url: str) -> None:
    found = problems({"targets": {}, "tools": {"t": {"url": url}}})
    assert len(found) == 1 and found[0].endswith("@ $.tools.t")


def test_an_agent_tool_on_a_missing_alias_is_a_warning() -> None:
    config = parse_config(
        {
            "targets": {"a": {"url": "http://a", "open_responses": {"adapter": True}}},
            "tools": {"helper": {"kind": "agent", "model": "small-model"}},
        }
    )
    assert config.warnings == (
        "agent tool 'helper' runs on 'small-model', which is not a configured alias "
        "@ $.tools.helper.model",
    )


def test_a_pool_setting_on_a_single_target_is_a_warning_naming_it() -> None:
    rules = [{"match_labels": {"purpose": "batch"}, "action": {"type": "deny"}}]
    config = parse_config({"targets": {"a": {"url": "http://a", "routing_rules": rules}}})
    assert config.warnings == (
        "'routing_rules' is a pool setting, ignored in the single-target form "
        '(list the provider under "providers" to use it) @ $.targets.a',
    )
    assert config.targets["a"].routing_rules == []  # as onwards: the single form has none


def test_a_pool_setting_in_a_target_list_is_a_warning_naming_the_item() -> None:
    config = parse_config(
        {"targets": {"a": [{"url": "http://a"}, {"url": "http://b", "strategy": "priority"}]}}
    )
    assert config.warnings == (
        "'strategy' is a pool setting, ignored in the single-target form "
        '(list the provider under "providers" to use it) @ $.targets.a[1]',
    )


def test_load_config_logs_its_warnings(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"targets": {"a": {"url": "http://a", "onwards_kye": "sk"}}}')
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("onwards_trio.config")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever another test left on "onwards_trio"
    try:
        config = load_config(path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert config.warnings
    assert seen == [f"config {path}: {w}" for w in config.warnings]


def test_cli_rejects_an_invalid_config_with_the_path_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"targets": {"m": {"url": 5}}}')
    result = subprocess.run(
        [sys.executable, "-m", "onwards_trio", "-f", str(path), "--no-watch", "--no-metrics"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "$.targets.m.url" in result.stderr
    assert "Traceback" not in result.stderr
