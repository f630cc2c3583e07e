"""Report section: mechanism (see :mod:gradsift.report.sections)."""

from __future__ import annotations
