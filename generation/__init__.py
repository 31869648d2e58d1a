"""ConceptCaps generation pipeline: one module per stage, and the `conceptcaps` CLI.

Stages read and write one run directory (see `conceptcaps_pipeline.run_dir`):
distill -> vae train -> vae sample -> captioner train -> captions generate
-> audio generate -> evaluate -> build -> tcav -> push.
"""

__version__ = "0.1.0"
