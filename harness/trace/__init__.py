"""The fd-lifecycle trace: its binary format, the reader, the model and the rules."""
