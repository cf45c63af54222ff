"""Offline evaluation: metrics, references and reports."""
