"""The deploy files for the tools operators already run: Prometheus alerting rules
(deploy/prometheus) and a Grafana dashboard (deploy/grafana), held against promtool, a JSON
schema, and the metric names the outer really exports."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import yaml

from uplimit.link.metrics import OuterMetrics

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "uplimit.json"
SCHEMA = ROOT / "tests" / "data" / "grafana-dashboard.schema.json"
PROMTOOL = shutil.which("promtool")
NAME = re.compile(r"\buplimit_[a-z_]+\b")
# Label matchers name labels, not metrics: uplimit_link_state{uplimit_link_state="serving"}
MATCHERS = re.compile(r"\{[^}]*\}")


def _exported() -> set[str]:
    """Every series name the outer's registry exposes, as Prometheus sees them."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in OuterMetrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def _names(expr: str) -> set[str]:
    return set(NAME.findall(MATCHERS.sub("", expr)))


def _alert_exprs() -> list[str]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_alerting_rules_pass_promtool_check_and_their_unit_tests(missing):
    if PROMTOOL is None:
        missing("promtool", "no promtool (make installs Debian's prometheus as root)")
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")):
        done = subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_matches_its_schema_and_the_schema_bites():
    dashboard = json.loads(DASHBOARD.read_text())
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    validator.validate(dashboard)
    broken = copy.deepcopy(dashboard)
    del broken["panels"][0]["gridPos"]
    assert not validator.is_valid(broken)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_deploy_files_use_only_metrics_the_outer_exports():
    exported = _exported()
    dashboard = json.loads(DASHBOARD.read_text())
    used_by = {"alerts.yml": _alert_exprs(), "uplimit.json": _dashboard_exprs(dashboard)}
    for where, exprs in used_by.items():
        unknown = set().union(*map(_names, exprs)) - exported
        assert not unknown, f"{where} uses metrics the outer does not export: {unknown}"
    # The dashboard shows every metric family the outer exports.
    shown = set().union(*map(_names, used_by["uplimit.json"]))
    families = {f.name for f in OuterMetrics().registry.collect()}
    missing = {f for f in families if not any(n.startswith(f) for n in shown)}
    assert not missing, f"the dashboard shows nothing of {missing}"


def test_metric_names_follow_prometheus_conventions():
    for name in _exported():
        assert re.fullmatch(r"uplimit_[a-z_]+", name), name
    counters = [f for f in OuterMetrics().registry.collect() if f.type == "counter"]
    assert counters and all(f.name + "_total" in _exported() for f in counters)
    units = ("_bytes", "_bytes_total", "_per_token")
    for family in OuterMetrics().registry.collect():
        if "bytes" in family.name or "bits" in family.name:
            assert family.name.endswith(units), family.name
