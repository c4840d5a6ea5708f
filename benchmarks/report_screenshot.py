"""Does a report fit a laptop screen? Render a report.html in headless Chromium at 1280x800,
save a screenshot, and measure whether anything overflows the window horizontally.

    python benchmarks/report_screenshot.py reports/legal/report/report.html [--out shot.png]
                                           [--width 1280] [--height 800]

The measurement loads a copy of the page with a small script appended (the report itself has
no script): on `load` it writes, into the DOM that `--dump-dom` prints, the document's
`scrollWidth` against the window's width and the elements whose right edge passes it (those
inside a box that scrolls or clips on its own, such as a wide table's container, are fine).
Exit status 1 when the page overflows. Needs a Chromium binary (`apt-get install -y chromium`
on Debian); `find_chromium` says which one runs.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
MARKER = "report-overflow-check"

# runs after every image is laid out; reports what sticks out past the window's right edge
PROBE = """<script>
window.addEventListener('load', () => {
  const width = document.documentElement.clientWidth;
  const clipped = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll' || o === 'hidden') return true; }
    return false; };
  const offenders = [];
  for (const el of document.body.querySelectorAll('*')) {
    const right = el.getBoundingClientRect().right;
    if (right > width + 0.5 && !clipped(el)) offenders.push({tag: el.tagName.toLowerCase(),
      text: (el.textContent || el.getAttribute('src') || '').trim().slice(0, 60), right: Math.round(right)});
  }
  const images = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
    natural: i.naturalWidth, shown: Math.round(i.getBoundingClientRect().width)}));
  const out = document.createElement('pre');
  out.id = 'MARKER_ID';
  out.textContent = JSON.stringify({scroll_width: document.documentElement.scrollWidth, window_width: width,
    offenders: offenders.slice(0, 20), images: images});
  document.body.appendChild(out);
});
</script>""".replace("MARKER_ID", MARKER)


def find_chromium() -> str | None:
    """The first Chromium-like binary on PATH, or None."""
    for name in BINARIES:
        if path := shutil.which(name):
            return path
    return None


def _chromium(binary: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # --no-sandbox: containers run as root, where Chromium's sandbox refuses to start
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def measure_overflow(report_html: Path, width: int = 1280, height: int = 800,
                     binary: str | None = None) -> dict[str, Any]:
    """{scroll_width, window_width, offenders, images, fits} of `report_html` at width x height."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium binary on PATH (Debian: apt-get install -y chromium)")
    report_html = report_html.resolve()
    page = report_html.read_text(encoding="utf-8")
    base = f'<base href="{report_html.parent.as_uri()}/">'  # the copy finds the report's figures
    page = page.replace("<head>", f"<head>{base}", 1) if "<head>" in page else base + page
    page = page.replace("</body>", PROBE + "</body>") if "</body>" in page else page + PROBE
    with tempfile.TemporaryDirectory() as tmp:
        probe_page = Path(tmp) / "probe.html"
        probe_page.write_text(page, encoding="utf-8")
        done = _chromium(binary, f"--window-size={width},{height}", "--virtual-time-budget=10000",
                         "--dump-dom", probe_page.as_uri())
    found = re.search(rf'<pre id="{MARKER}">(.*?)</pre>', done.stdout, re.DOTALL)
    if not found:
        raise RuntimeError(f"Chromium printed no measurement (exit {done.returncode}): {done.stderr[-500:]}")
    result = json.loads(html.unescape(found.group(1)))
    result["fits"] = result["scroll_width"] <= width and not result["offenders"]
    return result


def screenshot(report_html: Path, out: Path, width: int = 1280, height: int = 800,
               binary: str | None = None) -> Path:
    """A PNG of the first screen of `report_html` as a width x height window shows it."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium binary on PATH (Debian: apt-get install -y chromium)")
    out = out.resolve()
    done = _chromium(binary, f"--window-size={width},{height}", "--virtual-time-budget=10000",
                     f"--screenshot={out}", report_html.resolve().as_uri())
    if not out.exists():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_html", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report_screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--full-height", type=int, default=0,
                        help="also a tall screenshot this many pixels high (the whole report), beside --out")
    args = parser.parse_args()
    binary = find_chromium()
    if binary is None:
        print("no Chromium binary on PATH (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    result = measure_overflow(args.report_html, args.width, args.height, binary)
    screenshot(args.report_html, args.out, args.width, args.height, binary)
    if args.full_height:
        tall = args.out.with_name(f"{args.out.stem}_full{args.out.suffix}")
        screenshot(args.report_html, tall, args.width, args.full_height, binary)
        print(f"full page: {tall}")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"{version}, window {args.width}x{args.height}: page width {result['scroll_width']} px, "
          f"{'fits' if result['fits'] else 'OVERFLOWS'}; screenshot {args.out}")
    for offender in result["offenders"]:
        print(f"  overflowing <{offender['tag']}> to x={offender['right']}: {offender['text']!r}")
    for image in result["images"]:
        print(f"  image {image['src']}: {image['natural']} px wide, shown at {image['shown']} px")
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
