"""Prometheus metrics, in a registry of mirrord's own (several daemons can live in one test process).

A job is labelled `mirrord_job`, not `job`: Prometheus gives every scraped series its own `job` (the scrape's
name), and a `job` label of ours would be renamed `exported_job` beside it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

job_runs = Counter("mirrord_job_runs", "Job runs by outcome", ["mirrord_job", "outcome"], registry=REGISTRY)
job_polls = Counter("mirrord_job_polls", "Upstream polls made by this replica (one replica polls per tick)",
                    ["mirrord_job"], registry=REGISTRY)
job_last_success = Gauge("mirrord_job_last_success_timestamp_seconds", "When each job last succeeded",
                         ["mirrord_job"], registry=REGISTRY)
job_counters = Counter("mirrord_job_items", "Counters reported by job runs", ["mirrord_job", "counter"],
                       registry=REGISTRY)
bytes_downloaded = Counter("mirrord_downloaded_bytes", "Bytes downloaded", ["service"], registry=REGISTRY)
bytes_uploaded = Counter("mirrord_uploaded_bytes", "Bytes uploaded", ["service"], registry=REGISTRY)
items_by_state = Gauge("mirrord_items", "Items by kind and state", ["kind", "state"], registry=REGISTRY)
transfer_seconds = Histogram("mirrord_transfer_duration_seconds", "Duration of downloads, packs and uploads",
                             ["kind"], registry=REGISTRY,
                             buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600))
job_failing = Gauge("mirrord_job_failing", "1 while a job's runs fail (its start included), else 0",
                    ["mirrord_job"], registry=REGISTRY)
job_interval = Gauge("mirrord_job_interval_seconds", "Each enabled job's schedule period (cron: 3600)",
                     ["mirrord_job"], registry=REGISTRY)
oldest_item_age = Gauge("mirrord_oldest_item_age_seconds",
                        "Seconds since the least recently changed item of each kind and state changed",
                        ["kind", "state"], registry=REGISTRY)
# A person in the loop ([pdis] approval = "required", `mirrord hold`). New labels say `mirrord_job`, never
# `job`: Prometheus's own `job` label (the scrape job) would overwrite it.
depositions_awaiting_approval = Gauge("mirrord_depositions_awaiting_approval",
                                      "Depositions packed and checked, waiting for a person's approval",
                                      registry=REGISTRY)
oldest_approval_age = Gauge("mirrord_oldest_approval_age_seconds",
                            "Seconds the longest-waiting deposition has awaited approval (0: none waits)",
                            registry=REGISTRY)
job_held = Gauge("mirrord_job_held", "1 while a person holds the job's outgoing writes (`mirrord hold`), else 0",
                 ["mirrord_job"], registry=REGISTRY)
