"""What operators look at: the alert rules are unit-tested with promtool, and
every metric a rule or a dashboard panel names is one a running sidecar
exposes, so a renamed metric breaks the build, not the dashboard."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from ..conftest import ROOT
from ..credentials.test_platform import platform_yaml

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"

METRIC_RE = re.compile(r"\bwts_[a-z_]+\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (Debian's prometheus package; tools/test-deps installs it)")
    return path


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_the_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout
    run = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         timeout=60, cwd=RULE_TESTS.parent)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_a_for_a_severity_a_runbook_and_tests_that_fire_and_stay_silent():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for rule in rules():
        name = rule["alert"]
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["runbook"] and rule["annotations"]["summary"], name
        mine = [(case, t) for case in cases for t in case["alert_rule_test"] if t["alertname"] == name]
        firing = [(case, t) for case, t in mine if t["exp_alerts"]]
        assert firing, f"{name}: no test where it fires"
        # Silent on a healthy series: a case expecting nothing, or a firing
        # case whose input holds series the expected alerts do not name.
        silent = any(not t["exp_alerts"] for _, t in mine) or any(
            len({s["series"].split("{")[1].split(",")[0] for s in case["input_series"]}) > len(t["exp_alerts"])
            for case, t in firing)
        assert silent, f"{name}: no test where a healthy series stays silent"


def test_a_rule_that_can_never_fire_fails_its_unit_test(tmp_path):
    """The promtool tests can fail: the same tests against rules whose
    thresholds no series reaches."""
    broken = RULES.read_text().replace("> 0.8", "> 10").replace("> 0.05", "> 10")
    (tmp_path / "rules.yaml").write_text(broken)
    (tmp_path / "rules.test.yaml").write_text(RULE_TESTS.read_text())
    run = subprocess.run([promtool(), "test", "rules", "rules.test.yaml"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode != 0
    assert "WeChatDailyFetchCapNear" in run.stdout + run.stderr and "WeChatUpstreamErrors" in run.stdout + run.stderr


async def test_every_metric_in_the_rules_and_the_dashboard_is_one_the_sidecar_exposes(
        make_sidecar, sim, redis_server, http):
    # A sidecar with every family on: Redis store, a platform app, tickets, a call.
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "m:"}}'
    running = await make_sidecar(platform_yaml(sim.url, top=store))
    async with http.get(f"{running.base}/mp/cgi-bin/ticket/getticket?type=jsapi") as resp:
        assert resp.status == 200
    async with http.get(f"{running.admin}/metrics") as resp:
        text = await resp.text()
    exposed: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        exposed |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    used = {m for rule in rules() for m in METRIC_RE.findall(rule["expr"])}
    used |= {m for expr in dashboard_exprs() for m in METRIC_RE.findall(expr)}
    assert len(used) >= 14           # the rules and panels are really read
    assert not used - exposed, f"named in rules or panels but not exposed: {sorted(used - exposed)}"


def test_the_dashboard_has_the_rows_the_readme_describes():
    board = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Calls", "Tokens", "Store", "Tickets and Open Platform", "Pushes to apps (callbacks listener)"]
    readme = (ROOT / "README.md").read_text()
    for row in rows:
        assert f"**{row}**" in readme
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
