"""The records a run leaves and how they are read: the run directory (report), live progress,
`fedlora status`, and the multirun sweep summary."""
