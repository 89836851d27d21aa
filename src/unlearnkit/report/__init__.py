"""`unlearnkit report`: one HTML + Markdown report over any set of unlearnkit output folders (docs/reports.md).

    from unlearnkit.report import find, write_report
    write_report(find(["runs/demo", "runs/relearn"]), "an/empty/folder")
"""
from .build import write_report
from .collect import find

__all__ = ["find", "write_report"]
