"""
The README and the pages under docs/ link to each other's sections: every relative link names a
file that exists and, with #anchor, a heading of that file (GitHub's anchor rule: lower case,
punctuation other than '-' and '_' dropped, spaces to '-').
"""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    out = set()
    for h in re.findall(r"^#+ +(.+?) *$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


def links(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_names_an_existing_file_and_heading():
    bad = []
    for page in PAGES:
        for target in links(page):
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(dest):
                bad.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                bad.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_the_anchor_rule_matches_githubs_on_known_headings(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("## Does D2C hold up?\n### 2. Score\n#### How reliable is the score\n## Choices where the paper is silent\n")
    assert anchors(str(page)) == {"does-d2c-hold-up", "2-score", "how-reliable-is-the-score",
                                  "choices-where-the-paper-is-silent"}
