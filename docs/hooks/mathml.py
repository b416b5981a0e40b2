r"""mkdocs hook: render the site's math to MathML at build time.

The pages write math in pymdownx.arithmatex's syntax (``$...$`` inline, ``$$...$$`` display);
arithmatex (``generic: true``) wraps each formula in ``<span class="arithmatex">\(...\)</span>``
or ``<div class="arithmatex">\[...\]</div>``. This hook adds a Markdown extension that replaces
the TeX inside those wrappers with MathML from ``latex2mathml``, so browsers render it natively
and the site needs no script and no network (no MathJax, no CDN). The same extension runs on the
docstrings that mkdocstrings renders: their numpydoc ``.. math::`` blocks and ``:math:`...```
roles are first rewritten to ``$$...$$`` and ``$...$``.

A formula that latex2mathml cannot convert (an unknown command is passed through as the text
``\foo``; an ``&`` outside a matrix environment) is logged as a warning, which fails
``mkdocs build --strict``, and is left as visible TeX in a ``<code>`` element.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import Any

from latex2mathml.converter import convert_to_element
from markdown import Extension, Markdown
from markdown.postprocessors import Postprocessor
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("mathml")

# latex2mathml has no \operatorname; \mathrm renders the same upright name.
_REWRITES = [(re.compile(r"\\operatorname\s*\{"), r"\\mathrm{")]

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.DOTALL)
_COMMAND = re.compile(r"\\[A-Za-z]+")
_ENTITY = re.compile(r"&amp;(#x[0-9A-Fa-f]+;)")

_RST_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
_RST_ROLE = re.compile(r":math:`([^`]+?)`")

_page = ["?"]  # the page being converted, named in warnings


class MathError(ValueError):
    """A formula that latex2mathml cannot render faithfully."""


def tex_to_mathml(tex: str, *, display: bool) -> str:
    """Return the MathML of one TeX formula; raise MathError if any of it would be lost."""
    source = tex.strip()
    for pattern, replacement in _REWRITES:
        source = pattern.sub(replacement, source)
    try:
        root = convert_to_element(source, display="block" if display else "inline")
    except Exception as exc:  # latex2mathml raises assorted exception types
        raise MathError(f"latex2mathml failed on {tex!r}: {exc}") from exc
    for element in root.iter():
        text = element.text or ""
        command = _COMMAND.search(text)
        if command:
            raise MathError(f"unsupported command {command.group()} in {tex!r}")
        if element.tag == "mi" and text == "&":
            raise MathError(f"'&' outside a matrix environment in {tex!r}")
    # latex2mathml stores operators as character references in the element text; keep them
    # as references rather than escaping their '&'.
    return _ENTITY.sub(r"&\1", ET.tostring(root, encoding="unicode"))


def _render(match: re.Match[str], *, display: bool, where: str) -> str:
    tex = html.unescape(match.group(1))
    tag = "div" if display else "span"
    try:
        mathml = tex_to_mathml(tex, display=display)
    except MathError as exc:
        log.warning("%s: %s", where, exc)
        return f'<{tag} class="arithmatex"><code>{html.escape(tex)}</code></{tag}>'
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def render_math(text: str, where: str = "page") -> str:
    """Replace every arithmatex (generic mode) wrapper in ``text`` by its MathML."""
    text = _BLOCK.sub(lambda m: _render(m, display=True, where=where), text)
    return _INLINE.sub(lambda m: _render(m, display=False, where=where), text)


class _RstMath(Preprocessor):
    """Rewrite numpydoc ``.. math::`` blocks and ``:math:`...``` roles to arithmatex syntax."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(lines):
            head = _RST_BLOCK.match(lines[i])
            if head is None:
                out.append(lines[i])
                i += 1
                continue
            indent = head.group("indent")
            body: list[str] = []
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
            ):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                i -= 1
                body.pop()
            formula = [line.strip() for line in body if line.strip()]
            out += ["", f"{indent}$$", *(indent + line for line in formula), f"{indent}$$", ""]
        # A role may run over a line break, as in a wrapped docstring paragraph.
        return _RST_ROLE.sub(r"$\1$", "\n".join(out)).split("\n")


class _MathML(Postprocessor):
    def run(self, text: str) -> str:
        return render_math(text, where=_page[0])


class MathMLExtension(Extension):
    """Markdown extension: numpydoc math to arithmatex syntax, arithmatex output to MathML."""

    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Markdown's API)
        """Register the preprocessor and the postprocessor on ``md``."""
        # After fenced code (25) is stashed, so a code block keeps a literal ``.. math::``.
        md.preprocessors.register(_RstMath(md), "rst_math", 24.9)
        # After raw_html (30) and amp_substitute (20): sees the final HTML.
        md.postprocessors.register(_MathML(md), "mathml", 5)


def on_config(config: Any) -> Any:
    """Add the extension; mkdocstrings renders docstrings with this same list of extensions."""
    if "pymdownx.arithmatex" not in config.markdown_extensions:
        log.warning("pymdownx.arithmatex is not enabled; no math will be rendered")
    elif not config.mdx_configs.get("pymdownx.arithmatex", {}).get("generic", False):
        log.warning("pymdownx.arithmatex needs `generic: true` for the MathML hook")
    config.markdown_extensions.append(MathMLExtension())
    return config


def _toc(items: Any, page_html: str) -> None:
    for item in items:
        heading = re.search(
            rf'<h[1-6] id="{re.escape(item.id)}"[^>]*>(.*?)(?:<a class="headerlink"|</h[1-6]>)',
            page_html,
            re.DOTALL,
        )
        if heading is not None and "<math" in heading.group(1):
            item.title = heading.group(1).strip()
        _toc(item.children, page_html)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Remember which page is being converted, for the warnings."""
    _page[0] = page.file.src_uri
    return markdown


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """Show a heading's math as MathML in the table of contents, not as its bare text.

    Python-Markdown's toc names a heading such as ``## Memory: $O(nd + b^2)$`` by the text of
    its rendered HTML, which would read "Memory: O(nd+b2)" in the navigation.
    """
    _toc(page.toc, html_text)
    return html_text
