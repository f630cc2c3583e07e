"""Render a report.html in headless Chromium: does every table fit the page? And a screenshot.

    python scripts/check_report_layout.py runs/demo/report.html [--width 1280] [--png report.png]

A copy of the page gets a small script that measures, after layout, every ``<table>`` against
the page's content width (the ``<body>`` box less its padding) and writes the result into the
DOM; Chromium (``--headless --dump-dom``) prints the DOM, and this script reads it back. A
table wider than the page (its last columns cut off or scrolled) is reported by id with its
width; the exit code is 1 when any table overflows. ``--png`` also saves a screenshot of the
whole page at that width (look at it: a table can fit and still be unreadable).

Needs a Chromium binary (``apt-get install -y chromium``; or ``--chromium PATH``). It runs
without a sandbox, GPU or network (``--no-sandbox --disable-gpu --disable-background-networking``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
<script>
window.addEventListener('load', () => {
  const body = document.body, cs = getComputedStyle(body);
  const width = body.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const tables = [...document.querySelectorAll('table')].map((t, i) => ({
    id: t.id || ('table-' + i), width: Math.ceil(t.getBoundingClientRect().width),
    scroll: t.scrollWidth}));
  const out = {content_width: Math.floor(width), viewport: window.innerWidth,
               page_height: Math.ceil(document.documentElement.scrollHeight), tables};
  const pre = document.createElement('pre');
  pre.id = 'layout-check';
  pre.textContent = JSON.stringify(out);
  body.appendChild(pre);
});
</script>
"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


def find_chromium(explicit: str | None = None) -> str:
    for name in [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome", "chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or pass --chromium PATH)")


def measure(html: Path, width: int = 1280, chromium: str | None = None, timeout: float = 120.0) -> dict:
    """The layout of every table of ``html`` at a window ``width`` px wide (see the module docstring)."""
    binary = find_chromium(chromium)
    page = html.read_text(encoding="utf-8")
    page = page.replace("</body>", MEASURE + "</body>", 1) if "</body>" in page else page + MEASURE
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page, encoding="utf-8")
        cmd = [binary, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},1000", "--dump-dom",
               probe.as_uri()]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"{html}: Chromium printed no layout measurement")
    data = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    data["overflowing"] = [t for t in data["tables"] if max(t["width"], t["scroll"]) > data["content_width"] + 1]
    return data


def screenshot(html: Path, png: Path, width: int, height: int, chromium: str | None = None,
               timeout: float = 120.0) -> Path:
    binary = find_chromium(chromium)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [binary, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--width", type=int, default=1280, help="window width in px (default 1280)")
    ap.add_argument("--png", type=Path, help="also save a screenshot of the whole page here")
    ap.add_argument("--max-height", type=int, default=16000, help="screenshot height cap in px")
    ap.add_argument("--chromium", help="the Chromium binary")
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"{args.html}: no such file", file=sys.stderr)
        return 2
    data = measure(args.html, args.width, args.chromium)
    print(f"content width {data['content_width']} px at a {args.width}-px window; {len(data['tables'])} tables")
    for t in data["tables"]:
        mark = "OVERFLOWS" if t in data["overflowing"] else "fits"
        print(f"  {t['id']}: {max(t['width'], t['scroll'])} px  {mark}")
    if args.png:
        height = min(data["page_height"], args.max_height)
        screenshot(args.html, args.png, args.width, height, args.chromium)
        print(f"screenshot: {args.png} ({args.width} x {height} px)")
    return 1 if data["overflowing"] else 0


if __name__ == "__main__":
    sys.exit(main())
