"""`conceptcaps evaluate`: scores a run with the eval/ metric modules and writes RUN/eval/."""
