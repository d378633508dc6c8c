"""What ships next to /metrics for Prometheus users: a Grafana dashboard and alert rules (docs/monitoring/).
Every metric they use must be one mirrord exports, and the gauges the alerts rely on must move."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mirrord import metrics
from mirrord.daemon import Mirrord
from tests.conftest import make_config
from tests.fakejobs import use_job
from tests.test_web import BrokenJob, get, metric_samples, seed, serve

MONITORING = Path(__file__).resolve().parents[1] / "docs" / "monitoring"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names() -> set[str]:
    """Every series name /metrics can carry, by each family's type (whether or not it has samples yet)."""
    return {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in SUFFIXES[family.type]}


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\bmirrord_[a-z_]+\b", text))


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
            "MirrordDepositionStuck"} <= set(rules)
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
    assert samples[("mirrord_job_failing", (("job", "fragalysis"),))] == 1
    assert samples[("mirrord_job_interval_seconds", (("job", "fragalysis"),))] == 120
    # seed(): the needs_attention deposition changed 2 minutes ago (test_web.ago(2)).
    age = samples[("mirrord_oldest_item_age_seconds", (("kind", "deposition"), ("state", "needs_attention")))]
    assert 100 < age < 600
