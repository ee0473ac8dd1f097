"""Jinja rendering of templates/ (StrictUndefined) and the shell quoting every rendered script uses."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

import jinja2

from runner.paths import TEMPLATES_DIR

if TYPE_CHECKING:
    pass


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shquote"] = shell_word
    env.filters["yamlstr"] = lambda v: '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return env


def shell_word(v: object) -> str:
    """Quote a value for a shell; `${RUNNER_*}` references stay expandable (double quotes), nothing else does."""
    s = str(v)
    if "${RUNNER_" in s and not any(c in s.replace("${RUNNER_", "").replace("}", "") for c in '"`$\\'):
        return f'"{s}"'
    return shlex.quote(s)


def render_template(template: str, **values: Any) -> str:
    """Render templates/<name> with StrictUndefined: a missing value is an error, never an empty string."""
    return _env().get_template(template).render(**values)
