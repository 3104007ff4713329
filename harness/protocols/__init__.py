"""Request/answer formats the clients speak: :mod:`.base` is the interface, one module each."""
