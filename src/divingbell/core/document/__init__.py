"""The node document: loading, schema, validation with paths, override resolution."""
