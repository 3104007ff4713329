"""The built-in scenario suite that ``pytest --target=X`` runs against any target."""
