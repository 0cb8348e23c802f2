"""Bounded replay buffers: reservoir, class-balanced, time-decayed window."""
