"""Serving-engine integrations (EPLB policies and adapters)."""
