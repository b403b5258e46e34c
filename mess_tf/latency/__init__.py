"""Measured latency: part timings on this host or on phones, kept in per-device latency tables."""
