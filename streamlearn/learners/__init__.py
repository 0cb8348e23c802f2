"""Learners: test-then-train over joined examples, with prequential scores."""
