"""One SQLite file on one machine: dedupe state and claims (``state``) and sweep cursors (``cursors``), each
through its own connection (``connection``)."""
