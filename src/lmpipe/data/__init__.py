"""Corpus preparation: load a text source, clean it, drop duplicates, split whole documents."""
