"""A persona's prompt templates as files: the Jinja2 environment that reads them, and
the check ``zeta-agent validate`` runs on them (the brain renders them, ``runtime.brain``).
"""

from __future__ import annotations

from pathlib import Path

import jinja2

INCIDENT_TEMPLATE = "incident.prompt.j2"


def environment(directory: Path) -> jinja2.Environment:
    # Plain text for a model, not HTML: escaping would mangle JSON and quotes.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def check_template(path: Path) -> str | None:
    """Why the persona's template cannot be used (missing, or not valid Jinja2), or None."""
    if not path.is_file():
        return f"prompt template {path} does not exist"
    templates = environment(path.parent)
    for name in (path.name, INCIDENT_TEMPLATE):
        try:
            templates.get_template(name)
        except jinja2.TemplateNotFound as exc:
            return f"prompt template {path.parent / str(exc)} does not exist"
        except jinja2.TemplateSyntaxError as exc:
            return f"{exc.filename}:{exc.lineno}: not a valid Jinja2 template: {exc.message}"
    return None
