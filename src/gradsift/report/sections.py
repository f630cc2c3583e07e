"""Report sections contributed by the analyses (evidence, mechanism, run health).

Each section is a function ``(store) -> str`` returning an HTML fragment (an
``<h2>`` and its content) or ``""`` when the run directory holds nothing for it.
:func:`render_sections` calls them in order; the page puts them after the
selection table. A section reads what its study wrote into the run directory
through the store; it never recomputes a study.
"""

from __future__ import annotations

from collections.abc import Callable

from gradsift.store import RunStore

Section = Callable[[RunStore], str]

SECTIONS: list[Section] = []


def register_section(fn: Section) -> Section:
    """Add ``fn`` to the report's sections (use as a decorator)."""
    SECTIONS.append(fn)
    return fn


def render_sections(store: RunStore) -> list[str]:
    """The HTML of every registered section that has something to show."""
    _load_builtin()
    return [html for fn in SECTIONS if (html := fn(store))]


_LOADED = False


def _load_builtin() -> None:
    # the analyses register their sections on import; imported here, not at module load,
    # because they import the store and the tables themselves
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import gradsift.report.section_evidence  # noqa: F401
    import gradsift.report.section_health  # noqa: F401
    import gradsift.report.section_mechanism  # noqa: F401
