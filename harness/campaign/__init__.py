"""Campaigns: long soak runs and exploration shared between workers through Redis."""
