"""The ConceptCaps dataset card: a Jinja template (template.md), the code that fills it from a
run (card.py, used by `conceptcaps build`) and its figures (figures.py)."""
