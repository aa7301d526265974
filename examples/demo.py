"""Placeholder demo."""
