"""Operator pages: server-rendered views, thin over the selectors and services."""
