"""The docs cannot drift: the config reference against the schema, README's links."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import (
    Config,
    HookConfig,
    HostPort,
    ServiceConfig,
    SmokeProbe,
    TargetConfig,
    parse_config,
)
from config.schema import SERVICE_SECTIONS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "config-reference.md"
# One YAML string each, not sections: the reference documents them as one key.
VALUE_CLASSES = (HostPort, TargetConfig)
REQUIRED = "*required*"


def schema_keys(cls: type[Any] = Config, prefix: str = "") -> dict[str, Any]:
    """Every config key the dataclasses define, as a dotted path -> its default.

    A list of sections (``gates.smoke``) is a key itself, and its items' keys are
    ``gates.smoke[].path``; a field without a default maps to REQUIRED.
    """
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        default: Any = REQUIRED if f.default is dataclasses.MISSING else f.default
        if cls is ServiceConfig:
            if f.name == "name":
                continue  # the service's key in the `services` mapping
            if f.name in SERVICE_SECTIONS:
                keys[path] = "top-level"  # the section, overriding the top-level one
                continue
        optional = [a for a in typing.get_args(hint) if a is not type(None)]
        if f.name == "upstreams" and len(optional) == 1:
            hint = optional[0]  # the single-service form: required unless `services`
        if hint is ServiceConfig or typing.get_args(hint)[:1] == (ServiceConfig,):
            keys[path] = default
            keys.update(schema_keys(ServiceConfig, path + ".<name>."))
            continue
        if dataclasses.is_dataclass(hint) and hint not in VALUE_CLASSES:
            assert isinstance(hint, type)
            keys.update(schema_keys(hint, path + "."))
            continue
        keys[path] = default
        args = typing.get_args(hint)
        item = args[0] if typing.get_origin(hint) is tuple and args else None
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            if item not in VALUE_CLASSES:
                keys.update(schema_keys(item, path + "[]."))
    return keys


def reference_rows() -> dict[str, str]:
    """``key -> default cell`` from the reference's table, in page order."""
    rows: dict[str, str] = {}
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([^`]+)` \| (.+?) \| .+ \|$", line)
        if match:
            key, default = match[1], match[2]
            assert key not in rows, f"{key} documented twice"
            rows[key] = default
    return rows


def test_every_schema_key_is_documented_and_every_documented_key_exists() -> None:
    documented = set(reference_rows())
    schema = set(schema_keys())
    assert documented - schema == set(), "documented but not in config/schema.py"
    assert schema - documented == set(), "in config/schema.py but not in the reference"


MINIMAL: dict[str, Any] = {
    "upstreams": {
        "blue": {"targets": ["http://127.0.0.1:9001"]},
        "green": {"targets": ["http://127.0.0.1:9002"]},
    }
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _with(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return dict(out)


@pytest.mark.parametrize("key", sorted(reference_rows()))
def test_documented_default_is_the_real_default(key: str) -> None:
    """Writing the documented default explicitly changes nothing."""
    cell = reference_rows()[key]
    schema_default = schema_keys()[key]
    if key.startswith("services"):
        _check_service_default(key, cell, schema_default)
        return
    if cell == REQUIRED or schema_default == REQUIRED:
        assert cell == schema_default == REQUIRED, f"{key}: required in one place only"
        return
    assert cell.startswith("`") and cell.endswith("`"), f"{key}: default not in backticks"
    value = yaml.safe_load(cell[1:-1])
    if "[]." in key:
        section, field = key.split("[].")
        # A list item with its required keys only, as YAML and as built in code.
        item, built = LIST_ITEMS[section]
        config = parse_config(_with(MINIMAL, section, [{**item, field: value}]))
        assert getattr(_get(config, section)[0], field) == getattr(built, field)
    else:
        assert _get(parse_config(_with(MINIMAL, key, value)), key) == _get(
            parse_config(MINIMAL), key
        )


LIST_ITEMS: dict[str, tuple[dict[str, Any], Any]] = {
    "gates.smoke": ({"path": "/probe"}, SmokeProbe("/probe")),
    "hooks": (
        {"on": ["switch"], "url": "http://h.test/"},
        HookConfig(("switch",), "http://h.test/"),
    ),
}
SERVICE = {"hosts": ["a.test"], "upstreams": MINIMAL["upstreams"]}


def _check_service_default(key: str, cell: str, schema_default: Any) -> None:
    """``services``: absent means the single-service form; a service's sections default
    to the top-level ones; its other keys as for any key."""
    if key == "services":
        assert cell == "`{}`" and schema_default == ()
        return
    field = key.removeprefix("services.<name>.")
    if cell == "*top-level*":
        assert schema_default == "top-level", f"{key}: not a section a service overrides"
        top = parse_config({**MINIMAL, "rollback": {"window": "1m"}})
        svc = parse_config({"services": {"a": SERVICE}, "rollback": {"window": "1m"}})
        assert getattr(svc.services[0], field) == getattr(top, field)
        return
    if cell == REQUIRED or schema_default == REQUIRED:
        assert cell == schema_default == REQUIRED, f"{key}: required in one place only"
        return
    assert cell.startswith("`") and cell.endswith("`"), f"{key}: default not in backticks"
    value = yaml.safe_load(cell[1:-1])
    plain = dict(SERVICE)
    plain.pop(field, None)
    explicit = _with(plain, field, value)  # nested for dotted keys (upstreams.blue.tls.x)
    a = parse_config({"services": {"a": plain}}).services[0]
    b = parse_config({"services": {"a": explicit}}).services[0]
    assert _get(a, field) == _get(b, field)


def test_readme_links_resolve_and_name_every_guide() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    for link in local:
        assert (ROOT / link).exists(), f"README links to missing {link}"
    for guide in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{guide.name}" in local, f"README does not link docs/{guide.name}"
    # The two commands the README promises.
    assert "bgproxy demo" in readme
    assert "pip install -e '.[test]' && python -m pytest tests/" in readme
