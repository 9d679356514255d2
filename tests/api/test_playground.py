"""The playground's page and static files as the app serves them: security headers, caching,
compression (static files only, never an API response), the on/off setting, API keys, vendored
libraries. The page in a real browser: tests/e2e/test_playground.py."""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath

import pytest
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.cli import settings_from_args
from glm_api.routers.playground import STATIC_DIR, static_version
from tests.conftest import make_settings

STATIC = f"/static/{static_version()}"
IMPORT = re.compile(r"""^\s*import\s+(?:[\w{},*\s]+\s+from\s+)?['"]([^'"]+)['"]""", re.MULTILINE)
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def page_client(**overrides) -> TestClient:
    """The app without models (its lifespan never runs): enough for the page and its files."""
    return TestClient(create_app(make_settings(**overrides)))


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


def parse_page(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def asset_urls(html: str) -> list[str]:
    """The page's script and link URLs, resolved against the page at /."""
    tags = parse_page(html).tags
    urls = [a.get("src") or a.get("href") for t, a in tags if t in ("script", "link") and (a.get("src") or a.get("href"))]
    assert all(not u.startswith("/") and "//" not in u for u in urls), "relative URLs only: the page may sit under a prefix"
    return [f"/{u}" for u in urls]


def module_graph(client: TestClient, entry: str) -> set[str]:
    """Every module URL reachable by static imports from ``entry`` (each fetched once)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        response = client.get(url)
        assert response.status_code == 200, url
        for spec in IMPORT.findall(response.text):
            assert spec.startswith("."), f"{url} imports {spec!r}: only relative imports of our own files"
            todo.append(resolve(f"{PurePosixPath(url).parent}/{spec}"))
    return seen


def resolve(url: str) -> str:
    parts: list[str] = []
    for part in url.split("/"):
        if part == "..":
            parts.pop()
        elif part not in (".", ""):
            parts.append(part)
    return "/" + "/".join(parts)


def test_the_page_forbids_inline_script_and_other_origins():
    response = page_client().get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = {d.strip().split(" ", 1)[0]: d.strip().split(" ", 1)[1] for d in response.headers["content-security-policy"].split(";")}
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "img-src", "connect-src"):
        assert csp[directive] == "'self'", directive
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'" and csp["form-action"] == "'none'"
    assert not re.search(r"unsafe|\*|https?:|data:|blob:", response.headers["content-security-policy"])
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"

    page = parse_page(response.text)
    assert page.script_text.strip() == ""
    for tag, attrs in page.tags:
        assert not [a for a in attrs if a.startswith("on") or a == "style"], (tag, attrs)
        assert tag != "style"
        if tag == "script":
            assert attrs.get("src", "").startswith(STATIC[1:] + "/")
    assert all(url.startswith(STATIC + "/") for url in asset_urls(response.text))


def test_every_asset_resolves_with_its_type_and_is_cached_for_good():
    client = page_client()
    html = client.get("/").text
    urls = set(asset_urls(html))
    entry = next(u for u in urls if u.endswith("/js/main.js"))
    urls |= module_graph(client, entry)
    assert len(urls) > 20  # our modules, marked, DOMPurify, highlight.js and its languages, styles
    for url in sorted(urls):
        response = client.get(url, headers={"Accept-Encoding": "identity"})
        assert response.status_code == 200, url
        assert response.headers["content-type"].split(";")[0] == TYPES[Path(url).suffix], url
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    # Another version's URL is not served: a new release never mixes files with an old page.
    assert client.get("/static/0000000000/app.css").status_code == 404


def test_static_files_and_the_page_are_gzipped_when_the_client_accepts_it():
    client = page_client()
    raw = (STATIC_DIR / "vendor" / "dompurify" / "purify.es.js").read_bytes()
    url = f"{STATIC}/vendor/dompurify/purify.es.js"
    with client.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as zipped:
        sent = b"".join(zipped.iter_raw())
    assert zipped.headers["content-encoding"] == "gzip"
    assert "accept-encoding" in zipped.headers["vary"].lower()
    assert len(sent) < len(raw) / 2 and gzip.decompress(sent) == raw
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == raw

    page = client.get("/", headers={"Accept-Encoding": "gzip"})
    assert page.headers["content-encoding"] == "gzip" and "{{static}}" not in page.text
    assert "content-encoding" not in client.get("/", headers={"Accept-Encoding": "identity"}).headers


def test_streamed_and_json_api_responses_are_never_compressed(client):
    headers = {"Accept-Encoding": "gzip, deflate, br"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    for path in ("/v1/chat/completions", "/chat"):
        with client.stream("POST", path, json=body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in response.headers, path
            assert "data: [DONE]" in response.read().decode()
    models = client.get("/v1/models", headers=headers)
    assert models.status_code == 200 and "content-encoding" not in models.headers


def test_no_playground_leaves_the_api_as_it_was():
    on, off = create_app(make_settings()), create_app(make_settings(playground=False))
    assert on.openapi() == off.openapi()  # the playground is not part of the API
    with_page, client = TestClient(on), TestClient(off)
    for method, path in [("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"), ("GET", "/models"),
                         ("POST", "/v1/chat/completions"), ("POST", "/chat"), ("GET", "/nowhere")]:
        a, b = with_page.request(method, path, json={}), client.request(method, path, json={})
        assert (a.status_code, a.json()) == (b.status_code, b.json()), path
    missing = client.get("/")
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert client.get(f"{STATIC}/app.css").status_code == 404


def test_setting_from_flag_and_environment(monkeypatch):
    monkeypatch.delenv("GLM_API_PLAYGROUND", raising=False)
    assert settings_from_args([]).playground is True
    assert settings_from_args(["--no-playground"]).playground is False
    monkeypatch.setenv("GLM_API_PLAYGROUND", "false")
    assert settings_from_args([]).playground is False


def test_the_page_and_its_files_need_no_key_the_api_does():
    client = page_client(api_keys=["sesame"])
    assert client.get("/").status_code == 200
    assert client.get(f"{STATIC}/js/main.js").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/static/elsewhere").status_code == 404  # open, but nothing is there
    # Without the playground, / is an ordinary route: the key comes first.
    assert page_client(api_keys=["sesame"], playground=False).get("/").status_code == 401


def test_vendored_libraries_carry_licence_and_version():
    vendor = STATIC_DIR / "vendor"
    readme = (vendor / "README.md").read_text()
    expected = {
        "marked": ("marked/marked.esm.js", "marked v{}"),
        "DOMPurify": ("dompurify/purify.es.js", "DOMPurify {}"),
        "highlight.js": ("highlight/core.min.js", "Highlight.js v{}"),
    }
    for name, (path, banner) in expected.items():
        row = re.search(rf"^\| \[{re.escape(name)}\][^|]*\| ([\d.]+) \|", readme, re.MULTILINE)
        assert row, f"{name} is not in vendor/README.md"
        head = (vendor / path).read_text()[:400]
        assert banner.format(row.group(1)) in head, f"{path} is not {name} {row.group(1)}"
        assert list((vendor / path).parent.glob("LICENSE*")), f"no licence beside {path}"
    assert "sourceMappingURL" not in "".join(p.read_text() for p in vendor.rglob("*.js"))


@pytest.mark.parametrize("module", sorted(p.name for p in (STATIC_DIR / "js").glob("*.js")))
def test_our_modules_never_write_markup_from_strings(module):
    """Model output reaches the DOM only through markdown.js (sanitised); everything else is text."""
    source = (STATIC_DIR / "js" / module).read_text()
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert risky not in source, f"{module} uses {risky}"
