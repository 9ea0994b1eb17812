"""Result dataclasses -> JSON (canonical), Markdown and PNG plots."""

from prunescope.report.io import markdown_table, to_jsonable, write_json, write_text

__all__ = ["markdown_table", "to_jsonable", "write_json", "write_text"]
