"""Monitoring: what the service showed and what users did next (the impression log), the raw
material of click joins, drift and calibration checks, replays and A/B or off-policy estimates."""
