"""The embedded demo: simulated drifting production traffic played through the service."""
