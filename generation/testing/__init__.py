"""Tiny random-weight models built from configs (LLM, MusicGen, CLAP, BERT, classifier) and synthetic
TCAV worlds: the `smoke` preset's `@tiny/` models and the tests use them; their output is noise."""
