"""Plumbing every stage shares: plug-in registries, presets, atomic writes, device facts, the launcher."""
