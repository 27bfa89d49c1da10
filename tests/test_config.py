"""proxy/config/: expansion, validation, and errors that name file, key, reason."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from proxy.config import ConfigError, load, parse

from .conftest import ROOT

GOOD = textwrap.dedent("""\
    listen: {host: 127.0.0.1, port: 8080}
    admin:  {host: 0.0.0.0, port: 9090, token: "${SIDECAR_ADMIN_TOKEN:-}"}
    upstream: {base_url: https://api.weixin.qq.com, timeout_s: 15}
    store: {kind: memory}
    refresh_errcodes: [40001, 40014, 42001]
    pass_token_errors: false
    apps:
      - name: mp
        appid: ${WECHAT_APPID}
        secret: ${WECHAT_APPSECRET}
        token_api: stable
        refresh_before_s: 240
    """)
ENV = {"WECHAT_APPID": "wxabc", "WECHAT_APPSECRET": "s3cr#et: x"}


def error_of(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, "cfg.yaml", ENV if env is None else env)
    return info.value


def test_the_design_example_parses_with_env_expansion():
    cfg = parse(GOOD, "cfg.yaml", ENV)
    app = cfg.apps[0]
    assert (app.name, app.appid, app.secret, app.token_api) == ("mp", "wxabc", "s3cr#et: x", "stable")
    assert cfg.admin.token == ""
    assert cfg.refresh_errcodes == {40001, 40014, 42001}
    assert cfg.listen.port == 8080 and cfg.upstream.timeout_s == 15.0


def test_defaults_and_per_app_upstream_for_wecom():
    cfg = parse("apps: [{name: corp, appid: ww1, secret: x, token_api: wecom}]", "c.yaml", {})
    assert cfg.apps[0].upstream == "https://qyapi.weixin.qq.com"
    assert cfg.apps[0].token_api == "wecom"
    assert cfg.listen.host == "127.0.0.1" and cfg.store.kind == "memory"


def test_numbers_may_come_from_the_environment():
    cfg = parse("listen: {port: '${PORT:-8181}'}\napps: [{name: a, appid: w, secret: s}]", "c.yaml", {})
    assert cfg.listen.port == 8181


def test_missing_variable_is_named():
    err = error_of(GOOD, {"WECHAT_APPID": "wx"})
    assert (err.file, err.key) == ("cfg.yaml", "apps[0].secret")
    assert "WECHAT_APPSECRET is not set" in str(err)


@pytest.mark.parametrize("mutation, key, reason", [
    ("listen: {host: 127.0.0.1, port: 8080, colour: red}", "listen.colour", "unknown key"),
    ("listen: {host: 127.0.0.1, port: eighty}", "listen.port", "must be an integer"),
    ("listen: {host: 127.0.0.1, port: 70000}", "listen.port", "between"),
    ("pass_token_errors: 'yes please'", "pass_token_errors", "true or false"),
    ("refresh_errcodes: []", "refresh_errcodes", "non-empty list"),
    ("store: {kind: etcd}", "store.kind", "memory or redis"),
    ("store: {kind: redis}", "store.url", "required"),
    ("upstream: {base_url: ftp://x}", "upstream.base_url", "http:// or https://"),
    ("surprise: 1", "surprise", "unknown key"),
])
def test_bad_values_name_the_key_and_the_reason(mutation, key, reason):
    top_key = mutation.split(":")[0]
    lines = [line for line in GOOD.splitlines() if not line.startswith(top_key + ":")]
    err = error_of("\n".join(lines) + "\n" + mutation + "\n")
    assert err.key == key and reason in err.reason


@pytest.mark.parametrize("apps, key, reason", [
    ("[{name: mp, appid: a, secret: s}, {name: mp, appid: b, secret: s}]", "apps[1].name", "duplicate"),
    ("[{name: cgi-bin, appid: a, secret: s}]", "apps[0].name", "collides with a WeChat path root"),
    ("[{name: sns, appid: a, secret: s}]", "apps[0].name", "collides"),
    ("[{name: 'a/b', appid: a, secret: s}]", "apps[0].name", "path segment"),
    ("[{name: mp, appid: a}]", "apps[0].secret", "exactly one of secret or secret_file"),
    ("[{name: mp, appid: a, secret: s, secret_file: /x}]", "apps[0].secret", "exactly one"),
    ("[{name: mp, appid: a, secret: s, token_api: oauth}]", "apps[0].token_api", "must be one of"),
    ("[{name: mp, secret: s}]", "apps[0].appid", "required"),
    ("[]", "apps", "non-empty list"),
    ("[{name: mp, appid: a, secret: s, refresh: 3}]", "apps[0].refresh", "unknown key"),
])
def test_bad_apps_are_config_errors(apps, key, reason):
    err = error_of(f"apps: {apps}\n")
    assert err.key == key and reason in err.reason


def test_secret_file_is_read_and_its_problems_named(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    cfg = parse(f"apps: [{{name: mp, appid: a, secret_file: {secret}}}]", "c.yaml", {})
    assert cfg.apps[0].secret == "from-a-file"
    err = error_of(f"apps: [{{name: mp, appid: a, secret_file: {tmp_path}/missing}}]")
    assert err.key == "apps[0].secret_file" and "cannot read" in err.reason


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path):
    err = error_of("listen: [unclosed\n")
    assert "not valid YAML" in err.reason and "line" in err.reason
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.yaml")


def test_repr_never_shows_the_secret():
    cfg = parse(GOOD, "cfg.yaml", ENV)
    assert "s3cr#et" not in repr(cfg) and "s3cr#et" not in cfg.summary()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def test_check_prints_a_summary_without_the_secret(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    result = run_cli("check", "--config", str(path), env=ENV)
    assert result.returncode == 0, result.stderr
    assert "mp: appid=wxabc token_api=stable" in result.stdout
    assert "s3cr#et" not in result.stdout + result.stderr


def test_check_exits_2_naming_file_key_and_reason(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("port: 8080", "port: nope"))
    result = run_cli("check", "--config", str(path), env=ENV)
    assert result.returncode == 2
    assert f"{path}: listen.port: must be an integer" in result.stderr


def test_config_path_falls_back_to_the_environment_variable(tmp_path):
    path = tmp_path / "elsewhere.yaml"
    path.write_text(GOOD)
    result = run_cli("check", env={**ENV, "SIDECAR_CONFIG": str(path)})
    assert result.returncode == 0 and str(path) in result.stdout


def test_run_with_a_bad_config_exits_2(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("apps: []\n")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2 and "apps: must be a non-empty list" in result.stderr
