"""`editscale.results`: the results API for notebooks (`editscale.report.results` documents it)."""

from .report.results import Results, compare_table, format_table, load  # noqa: F401
