"""The documentation site: math rendered at build time, nothing fetched from a CDN.

The site tests build the mkdocs site (``mkdocs build --strict``) into a temporary folder and
read the HTML. They need the docs extra (``pip install -e ".[docs]"``) and skip without it.
The citation test needs nothing beyond git.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Hosts a math renderer would be fetched from; the site must ship its math instead.
MATH_HOSTS = re.compile(r"cdn\.jsdelivr|polyfill\.io|unpkg|mathjax|cdnjs|katex", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:https?:)?//", re.IGNORECASE)
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$", "\\frac", "\\mathrm", "\\sum", ".. math::", ":math:")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _pages(site: Path) -> dict[str, str]:
    pages = {str(p.relative_to(site)): p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    assert "math/index.html" in pages
    return pages


def _visible_text(page: str) -> str:
    """The page without its scripts, code and tags: what a reader sees as text."""
    page = re.sub(r"(?s)<(script|style|code|pre)\b.*?</\1>", " ", page)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", page))


def _source_formulas() -> tuple[int, int]:
    """(display, inline) formula counts in docs/math.md, from its Markdown source."""
    text = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^```.*?^```", " ", text)  # fenced code
    text = re.sub(r"`[^`\n]*`", " ", text)  # inline code
    display = re.findall(r"(?s)\$\$.+?\$\$", text)
    text = re.sub(r"(?s)\$\$.+?\$\$", " ", text)
    inline = re.findall(r"\$[^$]+\$", text)
    assert text.count("$") == 2 * len(inline)
    return len(display), len(inline)


def test_no_math_from_a_cdn(site: Path) -> None:
    for name, page in _pages(site).items():
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", page):
            for url in re.findall(r'(?:src|href)="([^"]*)"', tag):
                if tag.startswith("<script"):
                    assert not EXTERNAL.match(url), f"{name} loads a script from {url}"
                assert not MATH_HOSTS.search(url), f"{name} references {url}"
    assert not list(site.rglob("mathjax*")), "a MathJax set-up is still shipped"


def test_math_page_is_mathml(site: Path) -> None:
    page = _pages(site)["math/index.html"]
    display, inline = _source_formulas()
    assert display > 10  # the counting above found the formulas
    assert inline > 100
    article = page[page.index('<article class="md-content__inner') :]
    blocks = len(re.findall(r'<math\b[^>]*display="block"', article))
    inlines = len(re.findall(r'<math\b[^>]*display="inline"', article))
    assert (blocks, inlines) == (display, inline)
    text = _visible_text(page)
    for tex in RAW_TEX:
        assert tex not in text, f"raw TeX {tex!r} left on the math page"


def test_every_page_renders_its_math(site: Path) -> None:
    for name, page in _pages(site).items():
        assert '<script type="math/tex' not in page, name
        assert not re.search(r'class="arithmatex">\s*\\[(\[]', page), f"raw TeX on {name}"
        assert not re.search(r'class="arithmatex">\s*<code>', page), f"unconverted TeX on {name}"
        text = _visible_text(page)
        for tex in RAW_TEX:
            assert tex not in text, f"raw TeX {tex!r} left on {name}"


def test_headings_keep_their_math_in_the_table_of_contents(site: Path) -> None:
    checked = 0
    for name, page in _pages(site).items():
        start = page.find('<article class="md-content__inner')
        nav, article = page[:start], page[start:]
        for heading in re.finditer(r'(?s)<h([2-6]) id="([^"]+)"[^>]*>(.*?)</h\1>', article):
            if "<math" not in heading.group(3):
                continue
            link = re.search(rf'(?s)href="#{re.escape(heading.group(2))}"[^>]*>(.*?)</a>', nav)
            assert link is not None, f"{name}: #{heading.group(2)} not in the table of contents"
            assert "<math" in link.group(1), f"{name}: #{heading.group(2)} lost its math"
            checked += 1
    assert checked > 0


def test_docstring_math_is_rendered(site: Path) -> None:
    """numpydoc ``.. math::`` and ``:math:`` in the docstrings become MathML on the API page."""
    page = _pages(site)["api/index.html"]
    assert len(re.findall(r'<math\b[^>]*display="block"', page)) >= 3
    assert len(re.findall(r'<math\b[^>]*display="inline"', page)) >= 5


def test_unconvertible_math_fails_the_strict_build(tmp_path: Path) -> None:
    """A formula latex2mathml would mangle stops ``mkdocs build --strict``, naming it."""
    pytest.importorskip("mkdocs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# T\n\nFine $x^2$, not $\\foo{x}$.\n")
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\n"
        "theme: mkdocs\n"
        "markdown_extensions:\n"
        "  - pymdownx.arithmatex:\n"
        "      generic: true\n"
        f"hooks:\n  - {ROOT / 'docs' / 'hooks' / 'mathml.py'}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode != 0
    assert "unsupported command \\foo" in proc.stderr + proc.stdout


# --- display math scrolls sideways only; the home page says how to build the site ---------

STYLESHEET = ROOT / "docs" / "stylesheets" / "mathml.css"
#: The element that holds a display formula: pymdownx.arithmatex's wrapper, which
#: mkdocs-material styles with ``overflow: auto``.
DISPLAY_MATH = ".md-typeset div.arithmatex"


def _css_rules(css: str) -> list[tuple[list[str], dict[str, str]]]:
    """The rules of a flat stylesheet: (selectors, declarations), in order.

    Comments are dropped; the declarations of a rule are read in order, a later one replacing
    an earlier one of the same property, as a browser does.
    """
    css = re.sub(r"(?s)/\*.*?\*/", " ", css)
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        declarations: dict[str, str] = {}
        for item in body.split(";"):
            if ":" in item:
                name, value = item.split(":", 1)
                declarations[name.strip().lower()] = " ".join(value.split()).lower()
        rules.append(([" ".join(s.split()) for s in selectors.split(",")], declarations))
    return rules


def _overflow_and_padding(declarations: dict[str, str], state: dict[str, str]) -> None:
    """Apply a rule's overflow and vertical padding to ``state`` (longhands and shorthands)."""
    for name, value in declarations.items():
        if name == "overflow":
            parts = value.split()
            state["overflow-x"], state["overflow-y"] = parts[0], parts[-1]
        elif name == "padding":
            parts = value.split()
            state["padding-top"] = parts[0]
            state["padding-bottom"] = parts[2] if len(parts) > 2 else parts[0]
        elif name in ("padding-block", "padding-block-start", "padding-block-end"):
            parts = value.split()
            if name != "padding-block-end":
                state["padding-top"] = parts[0]
            if name != "padding-block-start":
                state["padding-bottom"] = parts[-1]
        elif name in ("overflow-x", "overflow-y", "padding-top", "padding-bottom"):
            state[name] = value


def _display_math_style(css: str) -> dict[str, str]:
    """What the stylesheet's rules for ``DISPLAY_MATH`` set, the last rule winning."""
    state: dict[str, str] = {}
    for selectors, declarations in _css_rules(css):
        if DISPLAY_MATH in selectors:
            _overflow_and_padding(declarations, state)
    return state


def _positive_length(value: str | None) -> bool:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)(px|em|rem|ex)", value or "")
    return match is not None and float(match.group(1)) > 0


def test_display_math_scrolls_sideways_only() -> None:
    """A display formula scrolls sideways, never up and down, and is not clipped.

    The theme gives the formula's container ``overflow: auto``; MathML ink a pixel beyond the
    box then made Chromium draw a vertical scrollbar beside every display equation. The site's
    stylesheet must turn the vertical overflow off on that container and pad it vertically.
    """
    style = _display_math_style(STYLESHEET.read_text(encoding="utf-8"))
    assert style.get("overflow-y") == "hidden", style
    assert style.get("overflow-x") == "auto", style  # wide formulas still scroll sideways
    assert _positive_length(style.get("padding-top")), style
    assert _positive_length(style.get("padding-bottom")), style
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"(?m)^extra_css:\n(?:\s+- .*\n)*\s+- stylesheets/mathml\.css$", config)


def test_the_site_stylesheet_comes_after_the_theme_and_overrides_it(site: Path) -> None:
    """Same selector as the theme's ``overflow: auto`` rule, later in the page: ours wins."""
    page = _pages(site)["math/index.html"]
    links = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
    ours = [i for i, href in enumerate(links) if href.endswith("stylesheets/mathml.css")]
    theme = [i for i, href in enumerate(links) if re.search(r"assets/stylesheets/main\.", href)]
    assert ours, links
    assert theme, links
    assert max(theme) < ours[0], links
    theme_css = (site / "math" / links[max(theme)]).resolve().read_text(encoding="utf-8")
    assert _display_math_style(theme_css).get("overflow-y") == "auto"  # what ours overrides
    assert '<div class="arithmatex"><math' in page


def test_home_page_says_how_to_build_and_serve_the_site() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"(?s)```bash\n(.*?)```", index))
    commands = [line.split("#")[0].strip() for line in blocks.splitlines()]
    for command in ('python -m pip install -e ".[docs]"', "mkdocs serve", "mkdocs build --strict"):
        assert command in commands, f"docs/index.md does not show {command!r}"
    # The same commands as DEVELOPERS.md, which CI follows.
    developers = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    for command in ('python -m pip install -e ".[docs]"', "mkdocs serve", "mkdocs build --strict"):
        assert command in developers


def test_no_citations_of_a_missing_design_document() -> None:
    """Nothing cites a design document that is not in this repository; cite docs/ pages."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    files = subprocess.run(
        [git, "ls-files", "-z", "--", "*.py", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    needles = ("DESIGN" + " section", "DESIGN" + ".md")  # split so this file does not match
    hits = []
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(needle in line for needle in needles):
                hits.append(f"{name}:{number}: {line.strip()}")
    assert not hits, "cites a missing design document:\n" + "\n".join(hits)
