"""The browser chat page of `dromedary serve`, for showing a model to people rather than a terminal.

`GET /` answers one HTML file, static/chat.html, with its script and styles inline: nothing is
built and nothing is fetched from elsewhere, so it works offline. The page talks to the server's
own /v1/chat/completions (streaming) and reads `GET /v1/dromedary/info` first: what is served
(model id, checkpoint, adapter, assistant name, context window) and the texts of the named system
prompts, which the page sends as a request's own system message.

The page itself asks for no key (it holds no secret and must load before a key can be typed);
the info endpoint is under /v1 and asks for it like every other endpoint. The page's
Content-Security-Policy allows only its own inline script (by hash) and requests to this server,
so even a rendering mistake could not run a script that came from model output.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Optional

from ..recipe import templates
from .openai_api import ModelCard

PAGE = Path(__file__).parent / "static" / "chat.html"


def info(card: ModelCard, *, system: str, checkpoint: Optional[str], adapter: Optional[str]) -> dict:
    """What `GET /v1/dromedary/info` answers. `system` is the server's --system: a name or a file,
    which the page offers first; `checkpoint` None is the embedded default."""
    prompts = {name: templates.load_system_prompt(name, card.assistant_name) for name in templates.SYSTEM_PROMPT_NAMES}
    if system not in prompts:  # a text file: offered under its path, beside the named ones
        prompts[system] = card.system
    return {
        "model": card.name,
        "checkpoint": checkpoint if checkpoint is not None else "the embedded default model",
        "adapter": adapter,
        "assistant_name": card.assistant_name,
        "window": card.window,
        "system": system,
        "system_prompts": prompts,
    }


def page_headers(html: str) -> dict[str, str]:
    """Only the page's own inline script may run (named by its sha256) and it may talk only to this
    server: model text that reached the DOM as markup still could not execute."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def install(app, page_info: dict) -> None:
    """Add the page and its info endpoint to a server.App's routes. The file is read here, at
    start, so a broken install fails before the model serves anything."""
    html = PAGE.read_text(encoding="utf-8")
    data, headers = html.encode("utf-8"), page_headers(html)
    app.route("/", "GET", lambda ex, _: ex.send_bytes(200, data, "text/html; charset=utf-8", headers), auth=False)
    app.route("/v1/dromedary/info", "GET", lambda ex, _: ex.send_json(200, page_info))
