"""On-disk formats: one module per format, each with a reader (and a writer where grokconv writes it)."""
