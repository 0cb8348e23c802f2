"""streamlearn keeps production ML models current from their own feedback.

It consumes inference logs and feedback from Kafka (or a JSONL file), joins them
into labeled examples, learns from each one test-then-train, and exports what an
operator needs to Prometheus.
"""

__version__ = "0.1.0"
