"""Report section: health (see :mod:gradsift.report.sections)."""

from __future__ import annotations
