"""Runners start a target somewhere (a local process, a container, a VM) and stop it."""
