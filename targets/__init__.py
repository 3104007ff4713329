"""Built-in targets: one folder per target, each with a ``target.toml`` manifest."""
