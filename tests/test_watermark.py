"""The event-time watermark across partitions."""

from __future__ import annotations

import math

from streamlearn.stream.watermark import NEVER, PartitionWatermarks


def test_watermark_is_the_slowest_live_partition():
    w = PartitionWatermarks(idle_timeout=2.0)
    w.observe("a:0", 100.0, now=0.0)
    w.observe("a:1", 50.0, now=0.0)
    assert w.current(now=0.1) == 50.0
    w.observe("a:1", 120.0, now=0.2)
    assert w.current(now=0.3) == 100.0


def test_an_assigned_silent_partition_holds_the_watermark_until_idle():
    w = PartitionWatermarks(idle_timeout=2.0)
    w.assign("b:0", now=0.0)
    w.observe("a:0", 100.0, now=0.0)
    assert w.current(now=1.0) == NEVER
    assert w.current(now=2.5) == math.nextafter(100.0, math.inf)  # all idle: all seen input counts, 100.0 included


def test_the_watermark_never_goes_backwards():
    w = PartitionWatermarks(idle_timeout=1.0)
    w.observe("a:0", 100.0, now=0.0)
    assert w.current(now=0.0) == 100.0
    w.observe("a:1", 10.0, now=0.5)  # a newly assigned partition far behind
    assert w.current(now=0.6) == 100.0


def test_revoked_partitions_stop_counting():
    w = PartitionWatermarks(idle_timeout=10.0)
    w.observe("a:0", 100.0, now=0.0)
    w.observe("a:1", 20.0, now=0.0)
    w.revoke("a:1")
    assert w.current(now=0.1) == 100.0
    assert w.newest() == 100.0
