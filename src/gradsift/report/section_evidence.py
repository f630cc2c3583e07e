"""Report section: evidence (see :mod:gradsift.report.sections)."""

from __future__ import annotations
