"""What ships next to /metrics for Prometheus users: a Grafana dashboard and alert rules (docs/monitoring/).
Every metric they use must be one mirrord exports, and the gauges the alerts rely on must move."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from mirrord import metrics
from mirrord.daemon import Mirrord
from tests.conftest import make_config, skip_unless_required
from tests.fakejobs import use_job
from tests.test_web import BrokenJob, get, metric_samples, seed, seed_decisions, serve

MONITORING = Path(__file__).resolve().parents[1] / "docs" / "monitoring"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names() -> set[str]:
    """Every series name /metrics can carry, by each family's type (whether or not it has samples yet)."""
    return {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in SUFFIXES[family.type]}


def used_names(text: str) -> set[str]:
    """The series names an expression reads; label names (`by (mirrord_job)`, `{mirrord_job="x"}`,
    `{{mirrord_job}}` legends) are not series."""
    text = re.sub(r"\{[^{}]*\}", "", re.sub(r"\{[^{}]*\}", "", text))
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    return set(re.findall(r"\bmirrord_[a-z_]+\b", text))


def label_names() -> dict[str, set[str]]:
    """Each metric family's own label names (what a series carries before the scrape adds job and instance)."""
    return {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def family(series: str) -> str:
    return next(f for f in label_names() if any(series == f + s for s in ("", "_total", "_bucket", "_sum", "_count")))


SCRAPE_LABELS = {"job", "instance"}  # what Prometheus sets on every scraped series


def test_own_labels_leave_the_scrape_labels_alone() -> None:
    """A `job` label of mirrord's would become `exported_job` next to the scrape's `job="mirrord"`."""
    for name, labels in label_names().items():
        assert not labels & SCRAPE_LABELS, f"{name} has a label Prometheus sets itself: {labels & SCRAPE_LABELS}"


def test_dashboard_groups_and_names_by_labels_mirrord_exports() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    grouped = {label.strip() for t in targets for by in re.findall(r"\bby \(([^)]*)\)", t["expr"])
               for label in by.split(",")}
    legends = {label for t in targets for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", ""))}
    exported = set().union(*label_names().values()) | {"instance", "le"}  # le: a histogram's buckets
    assert "mirrord_job" in grouped and "mirrord_job" in legends
    assert grouped | legends <= exported, f"not labels of mirrord's series: {(grouped | legends) - exported}"


def test_alert_unit_tests_feed_series_as_a_scrape_stores_them() -> None:
    """prometheus-alerts.test.yml's mirrord_* series carry exactly mirrord's labels plus the scrape's."""
    yaml = pytest.importorskip("yaml")
    tests = yaml.safe_load((MONITORING / "prometheus-alerts.test.yml").read_text())["tests"]
    checked = 0
    for series in (s["series"] for t in tests for s in t["input_series"]):
        name, labels = re.fullmatch(r"(\w+)\{(.*)\}", series).groups()
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert labels["job"] == "mirrord" and "instance" in labels, series
        if name.startswith("mirrord_"):
            assert set(labels) - SCRAPE_LABELS == label_names()[family(name)], series
            checked += 1
    assert checked >= 5


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_unless_required("promtool is not installed (Debian: apt-get install prometheus)",
                             "MIRRORD_REQUIRE_PROMTOOL")
    for args in (["check", "rules", "prometheus-alerts.yml"], ["test", "rules", "prometheus-alerts.test.yml"]):
        proc = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    alerts = (MONITORING / "prometheus-alerts.yml").read_text()
    for source, text in (("dashboard", exprs), ("alerts", alerts)):
        used = used_names(text)
        assert used, source
        assert used <= exported_names(), f"{source} uses metrics mirrord does not export: {used - exported_names()}"


def test_alert_rules_cover_what_an_operator_is_woken_for() -> None:
    yaml = pytest.importorskip("yaml")
    rules = {r["alert"]: r for g in yaml.safe_load((MONITORING / "prometheus-alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert {"MirrordJobFailing", "MirrordItemsNeedAttention", "MirrordNoSuccessfulPoll",
            "MirrordDepositionStuck", "MirrordApprovalWaiting"} <= set(rules)
    assert all(r["expr"] and r["annotations"]["summary"] for r in rules.values())


async def test_the_gauges_the_alerts_read_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, BrokenJob)
    config = make_config(tmp_path, fragalysis={"enabled": True, "interval": "2m", "jitter": 0})
    async with Mirrord(config) as app:
        await seed(app.store)
        server, url = await serve(app)
        try:
            await app.runner.run("fragalysis")
            text = (await get(f"{url}/metrics"))[2]
        finally:
            await server.stop()
    samples = metric_samples(text)
    assert samples[("mirrord_job_failing", (("mirrord_job", "fragalysis"),))] == 1
    assert samples[("mirrord_job_interval_seconds", (("mirrord_job", "fragalysis"),))] == 120
    # seed(): the needs_attention deposition changed 2 minutes ago (test_web.ago(2)).
    age = samples[("mirrord_oldest_item_age_seconds", (("kind", "deposition"), ("state", "needs_attention")))]
    assert 100 < age < 600


def test_person_alert_rules_pass_their_promtool_tests() -> None:
    """The approval alert fires after a day and not before; dismissed items and depositions resting in
    awaiting_approval or dismissed wake nobody (docs/monitoring/prometheus-person-alerts.test.yml)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI (Debian: apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    run = subprocess.run([promtool, "test", "rules", "prometheus-person-alerts.test.yml"], cwd=MONITORING,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


async def test_the_approval_and_hold_gauges_move(tmp_path: Path) -> None:
    from mirrord.store.models import Deposition, utcnow
    from mirrord.ui import actions

    config = make_config(tmp_path)
    async with Mirrord(config) as app:
        await seed_decisions(app.store)
        async with app.store.write() as session:  # deposition 3 has waited since yesterday
            (await session.get(Deposition, 3)).updated_at = utcnow() - dt.timedelta(hours=30)
        await actions.hold(app.store, "pdis", reason="PDIS maintenance", actor="ada")
        server, url = await serve(app)
        try:
            before = metric_samples((await get(f"{url}/metrics"))[2])
            await actions.approve(app.store, ref="3", reason="checked", actor="ada")
            await actions.hold(app.store, "pdis", reason="maintenance over", actor="ada", resume=True)
            await actions.dismiss(app.store, "deposition", "2", reason="PDIS will never read it", actor="ada")
            after = metric_samples((await get(f"{url}/metrics"))[2])
        finally:
            await server.stop()
    assert before[("mirrord_depositions_awaiting_approval", ())] == 1
    assert 30 * 3600 - 60 < before[("mirrord_oldest_approval_age_seconds", ())] < 31 * 3600
    assert before[("mirrord_job_held", (("mirrord_job", "pdis"),))] == 1
    assert before[("mirrord_job_held", (("mirrord_job", "designhub"),))] == 0
    assert before[("mirrord_items", (("kind", "deposition"), ("state", "needs_attention")))] == 1
    assert after[("mirrord_depositions_awaiting_approval", ())] == 0
    assert after[("mirrord_oldest_approval_age_seconds", ())] == 0
    assert after[("mirrord_job_held", (("mirrord_job", "pdis"),))] == 0
    # A dismissed item leaves needs_attention (and so MirrordItemsNeedAttention).
    assert ("mirrord_items", (("kind", "deposition"), ("state", "needs_attention"))) not in after
    assert after[("mirrord_items", (("kind", "deposition"), ("state", "dismissed")))] == 1
