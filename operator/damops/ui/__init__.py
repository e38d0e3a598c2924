"""The dashboard: `damops ui`, or `damops run --ui` beside the main job.

A Starlette app over the same functions as the CLI (damops.operations and
damops.lifecycle): pages rendered by Jinja2 and refreshed by htmx, and a JSON
API under /api/. Read-only unless DAMOPS_UI_TOKEN is set.
"""
