"""Every `.md` document the repository cites exists in it, and every `§N.M` cited after it is a section of it.

A document's sections are its numbered headings (``## 4.``, ``### 4.2 ...``) and the numbered list items
directly under a numbered heading (item 3 under ``## 7.`` is §7.3)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "docs", "benchmarks", "scripts", "tests", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}
# (citing file, cited name) that deliberately name something the repository does not hold under that path
EXEMPT = {
    ("tests/data/conftest.py", "shared/data/camvid/README.md"),  # the CamVid folder's own README, outside
    ("tests/test_paper_presets.py", "reproducing-cause.md"),     # joined as docs / "reproducing-cause.md"
}
SELF = Path(__file__).resolve()  # this file plants bad citations in its own strings

# a name ending in .md that is not the tail of a longer name, path or URL
DOC = re.compile(r"(?<![\w/.:\-])([\w./\-]*[\w\-]\.md)(?!\w)")
NUMBER = r"\d+(?:\.\d+)*"
# sections right after the name: "§2", "§8.1-8.5", "§2-§3", "§2.9, §3.2" (a comma needs its own §)
SECTIONS = re.compile(rf"^[`*)\]]*\s*§\s*{NUMBER}(?:\s*[-–]\s*§?\s*{NUMBER}|\s*(?:,|and|or)\s*§\s*{NUMBER})*")
HEADING = re.compile(rf"^#{{1,6}}\s+§?\s*({NUMBER})\.?(?:\s|$)")
ITEM = re.compile(r"^ {0,3}(\d+)\.\s")


def sections(doc: Path) -> set[str]:
    found, current = set(), None
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = HEADING.match(line)
            current = heading.group(1) if heading else None
            if current:
                found.add(current)
        elif current and (item := ITEM.match(line)):
            found.add(f"{current}.{item.group(1)}")
    return found


def scanned_files(root: Path) -> list[Path]:
    files = []
    for top in SCANNED:
        path = root / top
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        files += [p for p in candidates if p.is_file() and p.suffix in SUFFIXES and p.resolve() != SELF]
    return files


def bad_citations(root: Path, exempt: set[tuple[str, str]] = frozenset()) -> list[str]:
    """'file:line: problem' for every citation of a missing document or of a section it lacks."""
    problems, cache = [], {}
    for path in scanned_files(root):
        rel = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in DOC.finditer(line):
                name = match.group(1)
                if (rel, name) in exempt:
                    continue
                targets = [(base / name).resolve() for base in (path.parent, root)]
                target = next((t for t in targets if t.is_file() and t.is_relative_to(root.resolve())), None)
                if target is None:
                    problems.append(f"{rel}:{number}: cites {name}, which the repository does not hold")
                    continue
                cited = SECTIONS.match(line[match.end():])
                if cited:
                    if target not in cache:
                        cache[target] = sections(target)
                    for section in re.findall(NUMBER, cited.group(0)):
                        if section not in cache[target]:
                            problems.append(f"{rel}:{number}: cites {name} §{section}, which it does not have")
    return problems


def test_repository_cites_only_documents_and_sections_it_holds():
    problems = bad_citations(ROOT, EXEMPT)
    assert not problems, "\n".join(problems)


def _tree(tmp_path: Path, text: str) -> Path:
    (tmp_path / "docs" / "methods").mkdir(parents=True)
    (tmp_path / "docs" / "methods" / "cause.md").write_text(
        "# CAUSE\n\n## 3. Step 2\n\n### 3.2 One iteration\n\n## 7. Departures\n\n1. first\n2. second\n\n"
        "## Notes\n\n3. not a section: under an unnumbered heading\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mod.py").write_text(text)
    return tmp_path


def test_sections_are_numbered_headings_and_the_items_under_them(tmp_path):
    assert sections(_tree(tmp_path, "") / "docs" / "methods" / "cause.md") == {"3", "3.2", "7", "7.1", "7.2"}


def test_good_citations_pass(tmp_path):
    text = ('"""(docs/methods/cause.md §3.2, §7.2) and `docs/methods/cause.md` §7.1-7.2; '
            'docs/methods/cause.md §3-§7."""\n# methods/cause.md, relative to this file\n')
    root = _tree(tmp_path, text)
    (root / "src" / "methods").mkdir()
    (root / "src" / "methods" / "cause.md").write_text("## 1. x\n")
    assert bad_citations(root) == []


def test_planted_bad_citations_fail(tmp_path):
    # the old names are split across string literals here, so that rewriting citations leaves them alone
    text = ("# the old bare name: " "cause.md §3.2\n"
            "# a missing section: docs/methods/cause.md §4.2\n"
            "# the end of a range: docs/methods/cause.md §7.1-7.3\n"
            "# an item under an unnumbered heading: docs/methods/cause.md §7.2, §8.3\n"
            "# outside the tree: ../shared/spec/" "stego.md\n"
            "# a URL is not a citation: https://github.com/owner/repo/blob/main/missing.md\n")
    assert bad_citations(_tree(tmp_path, text)) == [
        "src/mod.py:1: cites " "cause.md, which the repository does not hold",
        "src/mod.py:2: cites docs/methods/cause.md §4.2, which it does not have",
        "src/mod.py:3: cites docs/methods/cause.md §7.3, which it does not have",
        "src/mod.py:4: cites docs/methods/cause.md §8.3, which it does not have",
        "src/mod.py:5: cites ../shared/spec/" "stego.md, which the repository does not hold",
    ]



# words about how the project is made, which a user's documentation has no use for
INTERNAL = re.compile(r"\b(sessions?|rounds?|lent)\b|\.\./shared", re.IGNORECASE)


def internal_words(root: Path, paths: list[Path]) -> list[str]:
    return [f"{path.relative_to(root).as_posix()}:{number}: {match.group(0)}"
            for path in paths for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            for match in INTERNAL.finditer(line)]


def test_readme_is_short_and_docs_speak_to_users():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) < 200
    assert internal_words(ROOT, [readme, *sorted((ROOT / "docs").rglob("*.md"))]) == []


def test_internal_words_are_found(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("Fits ran over six Sessions.\nThe previous round.\nNo GPU was lent.\nData: ../shared/data\n"
                    "Rounded, rounding, talent, shared: fine.\n")
    assert internal_words(tmp_path, [page]) == ["x.md:1: Sessions", "x.md:2: round", "x.md:3: lent",
                                                "x.md:4: ../shared"]
