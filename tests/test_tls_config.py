"""The ``tls`` section as ``bgproxy check`` and the loader see it: each problem with its
key path, certificate files judged (unreadable, mismatched, expired, expiring soon)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli import bgproxy
from tlskit import TestCA

from config import ConfigError, parse_config
from conftest import config_dict


def with_tls(**tls: Any) -> dict[str, Any]:
    return config_dict(["http://127.0.0.1:9001"], ["http://127.0.0.1:9002"], tls=tls)


def pair(cert: Path | str, key: Path | str) -> dict[str, str]:
    return {"cert": str(cert), "key": str(key)}


def test_defaults_and_a_full_section(tmp_path: Path) -> None:
    assert parse_config(with_tls()).tls.listen is None
    leaf = TestCA(tmp_path).issue("shop.example.com")
    tls = parse_config(
        with_tls(
            listen="0.0.0.0:8443",
            certificates=[pair(leaf.cert, leaf.key)],
            min_version=1.3,  # unquoted YAML: a float, taken as meant
            alpn=["http/1.1"],
            redirect_http=True,
            hsts="max-age=31536000; includeSubDomains",
            handshake_timeout="5s",
        )
    ).tls
    assert (str(tls.listen), tls.min_version, tls.handshake_timeout) == ("0.0.0.0:8443", "1.3", 5.0)
    assert tls.certificates[0].cert == str(leaf.cert)


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"min_version": "1.1"}, 'tls.min_version: must be "1.2" or "1.3"'),
        ({"alpn": []}, "tls.alpn: must list at least one protocol"),
        ({"hsts": "max-age=1\r\nX: y"}, "tls.hsts: expected a header value"),
        ({"handshake_timeout": 0}, "tls.handshake_timeout: must be greater than 0"),
        ({"listen": "127.0.0.1:8443"}, "tls.certificates: required with tls.listen"),
        ({"redirect_http": True}, "tls.redirect_http: needs tls.listen"),
        ({"certificates": [{"cert": "a.crt"}]}, "tls.certificates[0].key: required"),
        ({"certificates": [{"cert": "a", "key": "b", "x": 1}]}, "tls.certificates[0].x: unknown"),
        ({"certificates": "a.crt"}, "tls.certificates: expected a list"),
        ({"sni": True}, "tls.sni: unknown key"),
    ],
)
def test_bad_settings_name_their_key(tls: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_tls(**tls))
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_tls_listen_may_not_collide_with_the_plain_listener() -> None:
    data = with_tls(listen="127.0.0.1:8080", certificates=[pair("a", "b")])
    data["listen"] = "0.0.0.0:8080"
    with pytest.raises(ConfigError, match=r"tls\.listen: 127\.0\.0\.1:8080 collides with listen"):
        parse_config(data)


def test_certificate_files_are_judged_with_their_key_path(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    good = ca.issue("good.example.com")
    other = ca.issue("other.example.com")
    expired = ca.issue("old.example.com", days=-1)
    (tmp_path / "junk.pem").write_text("junk\n")
    with pytest.raises(ConfigError) as info:
        parse_config(
            with_tls(
                listen="127.0.0.1:0",
                certificates=[
                    pair(good.cert, good.key),
                    pair(good.cert, other.key),
                    pair(tmp_path / "missing.crt", good.key),
                    pair(tmp_path / "junk.pem", good.key),
                    pair(good.cert, tmp_path / "junk.pem"),
                    pair(expired.cert, expired.key),
                ],
            )
        )
    errors = info.value.errors
    assert errors[0] == (
        f"tls.certificates[1].key: {other.key} does not match the certificate in {good.cert}"
    )
    assert errors[1].startswith(f"tls.certificates[2].cert: cannot read {tmp_path}/missing.crt")
    assert errors[2] == f"tls.certificates[3].cert: {tmp_path}/junk.pem is not a PEM certificate"
    assert errors[3] == f"tls.certificates[4].key: {tmp_path}/junk.pem is not a PEM private key"
    assert errors[4].startswith("tls.certificates[5].cert: the certificate expired on ")
    assert len(errors) == 5


async def test_check_warns_about_a_certificate_expiring_soon(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    soon = ca.issue("soon.example.com", days=5.5)
    fine = ca.issue("fine.example.com", days=60)
    path = tmp_path / "bgproxy.yaml"
    path.write_text(yaml.safe_dump(with_tls(
        listen="127.0.0.1:8443", certificates=[pair(fine.cert, fine.key), pair(soon.cert, soon.key)]
    )))  # fmt: skip
    code, out, err = await bgproxy("check", "-c", str(path))
    assert code == 0, err
    assert out.strip() == f"{path}: ok"
    assert err.startswith("warning: tls.certificates[1].cert: the certificate expires in 5 days")
    # An expired one is an error: exit 2, the key path on stderr.
    old = ca.issue("old.example.com", days=-3)
    path.write_text(yaml.safe_dump(with_tls(
        listen="127.0.0.1:8443", certificates=[pair(old.cert, old.key)]
    )))  # fmt: skip
    code, out, err = await bgproxy("check", "-c", str(path))
    assert code == 2
    assert err.startswith("tls.certificates[0].cert: the certificate expired on ")
