"""
Tests for L{rqtwisted.root}: ports, the config of a root, and laying one out.
"""

from __future__ import annotations

import pytest

from rqtwisted.root import ConfigError, RootConfig, init_root, parse_port


@pytest.mark.parametrize("value, expected", [(0, 0), (3333, 3333), (65535, 65535), ("80", 80), (" 80 ", 80)])
def test_parse_port(value: object, expected: int) -> None:
    """
    Integers and decimal text from 0 to 65535 are ports.
    """
    assert parse_port(value) == expected


@pytest.mark.parametrize("value", [-1, 65536, 99999, "abc", "", "3.5", "+80", "8_0", "\u0663", True, None, 80.0])
def test_parse_port_refuses(value: object) -> None:
    """
    Anything else is refused, out-of-range numbers included.
    """
    with pytest.raises(ValueError):
        parse_port(value)


@pytest.mark.parametrize("port", [99999, "abc", -5])
def test_config_with_invalid_port(port: object) -> None:
    """
    A config.json whose port cannot be listened on is refused when read.
    """
    with pytest.raises(ConfigError, match="config.json has an invalid port"):
        RootConfig.fromDict({"host": "h", "port": port})


@pytest.mark.parametrize("port", ["abc", "99999", 70000])
def test_init_root_checks_port_first(tmp_path, port: object) -> None:
    """
    An invalid port is refused before anything is created.
    """
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as info:
        init_root(str(root), port=port)
    assert info.value.reason == f"--port must be an integer from 0 to 65535, not {port!r}"
    assert not root.exists()
