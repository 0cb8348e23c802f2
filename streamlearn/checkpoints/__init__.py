"""Transactional snapshots: the store on disk, and the snapshotter that feeds it off the hot path."""
