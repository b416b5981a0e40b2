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
