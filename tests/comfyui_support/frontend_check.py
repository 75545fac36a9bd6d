"""Load UI workflows in ComfyUI's own page (headless Chromium through Playwright).

The frontend is the one judge of a UI workflow: it decides which nodes are missing, maps the
positional ``widgets_values`` onto widgets (seed controls, upload buttons) and turns the graph
into the API prompt it would queue. :func:`load_in_page` reports all three for each workflow.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` Python package
(only its driver is used; no browser is downloaded: ``executable_path`` points at Chromium).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--metrics-recording-only"]
# First-run dialogs and overlays that would cover the graph.
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}

_INSPECT = """async ([wf, name]) => {
    const app = window.app;
    await app.loadGraphData(wf, true, true, name);
    await new Promise(r => setTimeout(r, 300));
    const nodes = app.graph._nodes.map(n => ({
        id: n.id, type: n.type,
        registered: !!LiteGraph.registered_node_types[n.type],
        widgets: (n.widgets || []).map(w => [w.name, w.value]),
    }));
    const prompt = (await app.graphToPrompt()).output;
    return {nodes, prompt};
}"""


def chromium_path() -> Optional[str]:
    for candidate in (os.environ.get("COMFYUI_BROWSER"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def available() -> Optional[str]:
    """None when the page can be driven here, else why not."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set COMFYUI_BROWSER)"
    return None


def load_in_page(server, workflows: dict[str, dict], screenshots: Optional[dict[str, Path]] = None,
                 timeout_ms: int = 120_000) -> dict[str, dict]:
    """Open ComfyUI's page and load each workflow; returns ``{name: {"nodes": ..., "prompt": ...}}``.

    ``screenshots`` maps workflow names to PNG paths to write once the graph is drawn.
    """
    from playwright.sync_api import sync_playwright

    for key, value in PAGE_SETTINGS.items():
        server.post(f"/settings/{key}", value)
    results: dict[str, dict] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 940}, device_scale_factor=1)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url("/"), wait_until="domcontentloaded", timeout=timeout_ms)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=timeout_ms)
            for name, wf in workflows.items():
                results[name] = page.evaluate(_INSPECT, [wf, name])
                results[name]["page_errors"] = list(errors)
                shot = (screenshots or {}).get(name)
                if shot is not None:
                    page.mouse.move(800, 900)  # an empty spot: no hover highlight or tooltip
                    time.sleep(2.0)  # image previews and fonts
                    Path(shot).parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot))
        finally:
            browser.close()
    return results
