"""Redis, shared by every replica: dedupe state and claims (``state``), the throttle budget (``throttle``),
sweep cursors (``cursors``); all under one deployment key prefix."""
