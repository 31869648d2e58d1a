"""`conceptcaps tcav`: which concepts of a release an audio classifier uses (TCAV with corrected statistics)."""
