"""One module per rule; :mod:`afterclose.harness.oracle.registry` lists them in order."""
