"""The README is the front door: short, linking every page of docs/, and no link in either leads nowhere."""

import glob
import os
import re
import subprocess

import pytest

from helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_the_readme_is_short_and_links_every_docs_page():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert readme.count("\n") <= 350
    pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages and pages <= set(LINK.findall(readme)), sorted(pages - set(LINK.findall(readme)))


def test_every_relative_link_and_anchor_resolves():
    for page in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        text = open(page, encoding="utf-8").read()
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(file), f"{os.path.relpath(page, ROOT)} links to {target}, which is not there"
            if anchor:
                assert anchor in anchors(open(file, encoding="utf-8").read()), f"{page}: no #{anchor} in {file}"


def test_what_the_documented_commands_write_is_ignored_by_git():
    # a user who runs them verbatim must not find their reports among the files to commit
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    outputs = set()
    for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
                 *glob.glob(os.path.join(ROOT, "*.py"))]:
        outputs |= set(re.findall(r"--(?:report|json|out_dir|out) (?!docs/)([\w-]*[./][\w./-]*)", open(path).read()))
    outputs |= {"eval.html", "eval.json"}  # the names a user picks for evaluate.py's in the root
    assert "out/eval.html" in outputs
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(outputs)
