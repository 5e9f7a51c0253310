"""The engine: observe -> plan -> apply, the journal of owned things and originals, locking."""
