"""Drive a real ComfyUI server for the FluxSR pack tests (stdlib only).

A :class:`ComfyServer` runs ``main.py --cpu`` of a ComfyUI checkout with its own base directory
(input, output, user, temp, custom_nodes all in a temporary folder, so the checkout is never
written to), an in-memory database, and an ``extra_model_paths.yaml`` that points ComfyUI at a
models folder and at a ``custom_nodes`` folder holding a link to this repository (the pack is
loaded exactly as a clone in ``custom_nodes`` would be). Prompts go through the HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-FluxSR"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """A prompt ComfyUI refused or failed; the message holds ComfyUI's own error text."""


class ComfyServer:
    """A ComfyUI server on 127.0.0.1 (``--cpu``) with the pack and the given models folder."""

    def __init__(self, comfy_dir: str | os.PathLike, python: str, models_dir: str | os.PathLike,
                 workdir: str | os.PathLike, port: Optional[int] = None, extra_args: tuple = (),
                 other_packs: tuple = (), env: Optional[dict] = None):
        """``other_packs``: folders of further custom node packs (e.g. ComfyUI-GGUF), linked
        beside this one; ``env``: environment variables added for the server."""
        self.other_packs = tuple(Path(p) for p in other_packs)
        self.extra_env = dict(env or {})
        self.comfy_dir = Path(comfy_dir)
        self.python = python
        self.models_dir = Path(models_dir)
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ------------------------------------------------------------------------

    def _layout(self) -> Path:
        base = self.workdir / "base"
        for sub in ("input", "output", "temp", "user", "custom_nodes"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        pack_parent = self.workdir / "pack_nodes"
        pack_parent.mkdir(parents=True, exist_ok=True)
        link = pack_parent / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for pack in self.other_packs:
            other = pack_parent / pack.name
            if not other.exists():
                other.symlink_to(pack.resolve(), target_is_directory=True)
        config = self.workdir / "extra_model_paths.yaml"
        config.write_text(
            "fluxsr_test:\n"
            f"    base_path: {self.models_dir}\n"
            "    diffusion_models: diffusion_models\n"
            "    vae: vae\n"
            "    loras: loras\n"
            "    text_encoders: text_encoders\n"
            "    fluxsr: fluxsr\n"
            f"    custom_nodes: {pack_parent}\n")
        return config

    @property
    def base(self) -> Path:
        return self.workdir / "base"

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        config = self._layout()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--extra-model-paths-config", str(config),
               "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}", "--disable-auto-launch",
               "--preview-method", "latent2rgb", *self.extra_args]
        env = dict(os.environ, **self.extra_env)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP -----------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def post(self, path: str, payload: Any, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url(path), data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(data) if data else None

    def object_info(self, node: Optional[str] = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""), timeout=120)

    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its id (ComfyError on validation errors)."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ComfyError(f"prompt refused: {json.dumps(answer['node_errors'])[:2000]}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait until the prompt finished; returns its history entry (status: success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue and wait; ComfyError unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise ComfyError("prompt failed: " + json.dumps(entry["status"].get("messages"))[:4000])
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def queue_state(self) -> dict:
        return self.get("/queue")

    def upload_image(self, path: str | os.PathLike) -> str:
        """Put an image into the server's input folder; returns the name LoadImage takes."""
        target = self.base / "input" / Path(path).name
        shutil.copyfile(path, target)
        return target.name

    def output_files(self, entry: dict) -> list[Path]:
        """The image files a finished prompt saved (SaveImage outputs)."""
        files = []
        for node_out in (entry.get("outputs") or {}).values():
            for img in node_out.get("images", []):
                folder = self.base / img.get("type", "output") / img.get("subfolder", "")
                files.append(folder / img["filename"])
        return files
