"""Load UI workflows in ComfyUI's own page (headless Chromium through Playwright).

The frontend is the one judge of a UI workflow: it decides which nodes are missing, maps the
positional ``widgets_values`` onto widgets (seed controls, upload buttons) and turns the graph
into the API prompt it would queue. :func:`load_in_page` reports all three for each workflow,
with the page errors raised while it loaded, apart from the page's own baseline: the errors it
raises on start and while loading an empty graph, before any of ours is there.

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
EMPTY_GRAPH = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [],
               "config": {}, "extra": {}, "version": 0.4}
# Errors some frontends raise on their own, whatever is loaded: (message, a frame its stack holds).
# Tolerated only in the baseline (page start plus an empty graph), never while our workflows load.
KNOWN_PAGE_ERRORS = [
    # Frontend 1.27.x: registering the core settings runs Comfy.Canvas.NavigationMode's onChange,
    # which sets Comfy.Canvas.LeftMouseClickBehavior before that setting is registered; the
    # store's onChange then reads ``setting.id`` of undefined. Fixed in later frontends.
    ("Cannot read properties of undefined (reading 'id')", "addSetting"),
]

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


def is_known_page_error(error: dict) -> bool:
    """True for an error in :data:`KNOWN_PAGE_ERRORS` (same message, the named frame in its stack)."""
    return any(error["message"] == message and frame in (error.get("stack") or "")
               for message, frame in KNOWN_PAGE_ERRORS)


def load_in_page(server, workflows: dict[str, dict], screenshots: Optional[dict[str, Path]] = None,
                 timeout_ms: int = 120_000) -> dict:
    """Open ComfyUI's page, load an empty graph, then each workflow.

    Returns ``{"frontend_version": str, "baseline_errors": [...], "workflows": {name: {"nodes": ...,
    "prompt": ..., "page_errors": [...]}}}``. Errors are ``{"message", "stack"}`` dicts; the
    baseline holds those raised on start and while the empty graph loaded, and each workflow's
    ``page_errors`` only those raised while it loaded (and was drawn). ``screenshots`` maps
    workflow names to PNG paths to write once the graph is drawn.
    """
    from playwright.sync_api import sync_playwright

    for key, value in PAGE_SETTINGS.items():
        server.post(f"/settings/{key}", value)
    results: dict[str, dict] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 940}, device_scale_factor=1)
            errors: list[dict] = []
            # The stack, not just the message: it tells the page's own bugs from ours.
            page.on("pageerror", lambda exc: errors.append({"message": exc.message, "stack": exc.stack}))
            page.goto(server.url("/"), wait_until="domcontentloaded", timeout=timeout_ms)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=timeout_ms)
            version = page.evaluate("() => String(window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown')")
            page.evaluate(_INSPECT, [EMPTY_GRAPH, "empty"])
            baseline = list(errors)
            for name, wf in workflows.items():
                errors.clear()
                results[name] = page.evaluate(_INSPECT, [wf, name])
                shot = (screenshots or {}).get(name)
                if shot is not None:
                    page.mouse.move(800, 900)  # an empty spot: no hover highlight or tooltip
                    time.sleep(2.0)  # image previews and fonts
                    Path(shot).parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot))
                results[name]["page_errors"] = list(errors)
        finally:
            browser.close()
    return {"frontend_version": version, "baseline_errors": baseline, "workflows": results}
