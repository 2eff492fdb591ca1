"""The whole loop on one machine (`run`: generate, train, register, promote, retag) and its HTML report
(`report`, `template.html`)."""

from .run import QuickstartOptions, make_data, run_quickstart

__all__ = ["QuickstartOptions", "make_data", "run_quickstart"]
