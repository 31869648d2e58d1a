"""`conceptcaps tcav`: which concepts of a release an audio classifier uses (TCAV with corrected statistics).

    from conceptcaps_pipeline.tcav import run, TcavSettings     # any torch model (tcav/api.py)
"""

from conceptcaps_pipeline.tcav.api import TcavSettings, run  # noqa: F401 - the public API
