"""e10: extra calibration sentences that ship offline: the prose of the Python docs in the stdlib's
pydoc_data/topics.py (and optionally the long descriptions in site-packages' *.dist-info/METADATA).

python e10.py OUT.txt [pydoc|metadata|both]
Keeps English-looking sentences: paragraphs of unindented lines (indented blocks are code or grammar), split
into sentences, 6-40 words, starting with a capital letter, ending with a period, few code characters.
The output is regenerated, not committed (third-party text).
"""
import email, glob, re, sys, sysconfig
sys.path.insert(0, "/work/main")
from distill.hf import text

CODE = re.compile(r"[=<>{}\[\]|`_*#@\\$]|::|\.\.\.|\(\)|https?:")


def paragraphs(doc: str):
    para = []
    for line in doc.splitlines():
        if line and not line[0].isspace() and not set(line) <= set("*=-~^#"):
            para.append(line.strip())
        else:
            if para:
                yield " ".join(para)
            para = []
    if para:
        yield " ".join(para)


def prose(docs):
    seen, out = set(), []
    for doc in docs:
        for p in paragraphs(doc):
            for s in text.split_sentences([p]):
                words = s.split()
                if not (6 <= len(words) <= 40) or not s[0].isupper() or not s.endswith("."):
                    continue
                if CODE.search(s) or sum(c.isalpha() or c in " ,.;:'\"()-" for c in s) < 0.97 * len(s):
                    continue
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def pydoc_docs():
    import pydoc_data.topics as t
    return list(t.topics.values())


def metadata_docs():
    site = sysconfig.get_paths()["purelib"]
    docs = []
    for m in sorted(glob.glob(f"{site}/*.dist-info/METADATA")):
        body = email.message_from_string(open(m, encoding="utf-8", errors="replace").read()).get_payload()
        docs.append(body if isinstance(body, str) else "")
    return docs


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "pydoc"
    docs = (pydoc_docs() if which in ("pydoc", "both") else []) + (metadata_docs() if which in ("metadata", "both") else [])
    sents = prose(docs)
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write("\n".join(sents) + "\n")
    print(which, len(sents), "sentences", sum(len(s.split()) for s in sents), "words")
