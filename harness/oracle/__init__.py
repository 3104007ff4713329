"""Oracle rules: black-box checks (no tracer needed) and their shared verdict types."""
