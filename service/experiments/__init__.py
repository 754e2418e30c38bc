"""Experiments: sticky A/B arms (`spec`, `manager`) and shadow lanes (`shadow`, `faults`), with the
ranking agreement they record (`agreement`), where the records go (`sinks`), and the offline tools
that read them (`report`, `replay`)."""
