"""The event-time watermark across partitions."""

from __future__ import annotations

import math

from streamlearn.stream.watermark import NEVER, PartitionWatermarks


def test_watermark_is_the_slowest_partition_with_input_left():
    w = PartitionWatermarks()
    w.observe("a:0", 100.0)
    w.observe("a:1", 50.0)
    assert w.current() == 50.0
    w.observe("a:1", 120.0)
    assert w.current() == 100.0


def test_an_assigned_silent_partition_holds_the_watermark_until_it_is_at_its_end():
    w = PartitionWatermarks()
    w.assign("b:0")
    w.observe("a:0", 100.0)
    assert w.current() == NEVER        # however long it is silent: it may have a backlog to deliver
    w.set_caught_up({"b:0"})
    assert w.current() == 100.0        # at its end: no longer held; a:0 may still deliver a tie at 100.0
    w.set_caught_up({"a:0", "b:0"})
    assert w.current() == math.nextafter(100.0, math.inf)  # all at their end: 100.0 included


def test_a_partition_that_delivers_again_holds_the_watermark_again():
    w = PartitionWatermarks()
    w.observe("a:0", 100.0)
    w.observe("a:1", 50.0)
    w.set_caught_up({"a:1"})
    assert w.current() == 100.0
    w.observe("a:0", 110.0)
    w.set_caught_up(set())             # a:1 has new input now: it holds from its newest
    assert w.current() == 100.0        # never backwards
    w.observe("a:1", 105.0)
    assert w.current() == 105.0


def test_the_watermark_never_goes_backwards():
    w = PartitionWatermarks()
    w.observe("a:0", 100.0)
    assert w.current() == 100.0
    w.observe("a:1", 10.0)  # a newly assigned partition far behind
    assert w.current() == 100.0


def test_bounded_out_of_orderness_holds_the_watermark_back_by_the_bound():
    w = PartitionWatermarks(max_out_of_order=30.0)
    w.observe("a:0", 100.0)
    assert w.current() == 70.0


def test_partitions_ahead_of_the_slowest_by_more_than_the_bound():
    w = PartitionWatermarks(max_out_of_order=50.0)   # the bound on disorder must not pause the slowest itself
    w.observe("a:0", 100.0)
    w.observe("a:1", 130.0)
    w.observe("a:2", 161.0)
    assert w.ahead(60.0) == {"a:2"}
    w.set_caught_up({"a:0"})
    assert w.ahead(60.0) == set()      # a:1 is the slowest with input left now


def test_revoked_partitions_stop_counting():
    w = PartitionWatermarks()
    w.observe("a:0", 100.0)
    w.observe("a:1", 20.0)
    w.revoke("a:1")
    assert w.current() == 100.0
    assert w.newest() == 100.0
