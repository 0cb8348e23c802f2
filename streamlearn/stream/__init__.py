"""Intake: sources, event decoding and validation, dead letters, the feedback join."""
