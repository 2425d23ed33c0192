"""Every number in README.md and benchmarks/README.md comes from a committed results file.

For each number outside code (fenced blocks and `inline code` are commands, flags and paths),
outside the sections and patterns of the allow-list below (each with its reason), the script
looks for it in the results files the claim names: a `benchmarks/results/*.md` file named (as
a link or in text, `results/x.md` too) on the same paragraph or table, in the paragraph just
before a table (its caption), or else in the same section. A number matches a number in the file
that rounds to it at the claim's precision (README "0.063" matches "0.0633"), thousands
separators ignored. A paragraph or table labelled "measured at <commit>" is reported as
labelled, not matched: a number measured on an older commit, said so where it is quoted.

Prints one line per number (where it appears, or LABELLED / UNMATCHED) and exits 1 listing the
unmatched ones.

    .venv/bin/python scripts/check_claims.py [FILE ...] [--results DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("README.md", "benchmarks/README.md")

#: sections whose numbers are contract, usage or layout, not measurements (heading text, exact)
SKIP_SECTIONS = {
    "Two commands": "install and run commands: versions and demo sizes are inputs, not results",
    "Your own data": "the output contract and usage: flag values and defaults",
    "What happens to bad rows": "error contract: exit statuses and limits",
    "Running on a cluster": "deployment instructions: ports, defaults",
    "Layout": "the source tree",
    "Changes to the contract": "the contract's changes (interfaces, not measurements)",
    "Running the feature benchmark": "the benchmark's flags and their defaults",
    "What each row is": "what each benchmark row runs (batch sizes, ranks: inputs)",
}

#: spans whose numbers are not measurements: (pattern, reason)
ALLOW = [
    (r"\b(?:torch|ray|Python|numpy)\s+\d+(?:\.\d+)+\+?", "version pin"),
    (r"\d+-core\b", "the machine's core count (hardware, not a result)"),
    (r"\b(?:r|alpha|d|K|M|N|k_o|k_i|H|V|lr|seed|B)\s?=\s?[\d.,]+(?:\s?x\s?\d+)?", "a setting: LoRA rank/alpha, projection dim, K/M/N, seed"),
    (r"\bd\s?=\s?\d[\d,]*", "projection dimension (a setting)"),
    (r"\bM\s?=\s?\d+N\b", "coarse-stage rule M = 4N (a setting)"),
    (r"\b(?:default|defaults to)\s+\d[\d,.]*", "a flag default"),
    (r"\(default[^)]*\)", "a flag default"),
    (r"sqrt\([^)]*\)", "a formula (the JL scale), not a measurement"),
    (r"\d+-bit\b|\bfloat(?:16|32|64)\b|\bint(?:8|16|32|64)\b", "a number format"),
    (r"2\^-?\d+|~?1e-\d+", "a precision constant of floating point"),
    (r"\b\d+(?:\.\d+)? = (?:a random pick|best|only domain rows)", "the meaning of a scale value"),
    (r"\bN\(0, 0\.01\^2\)", "the initialisation of B (a setting)"),
    (r"\b(?:Wang et al\.|arXiv)\s*[\d.]*\s*\d{4}\.\d{5}", "the paper's arXiv id"),
    (r"\b\d+\s?(?:stage|stages|columns|files)\b", "counts of parts of the design"),
    (r"\b\d+ epochs by default", "a flag default"),
    (r"\bstep \d+|\bstop \d+|\bstops?\b \d+", "a development stop number"),
    (r"\b(?:top|Top)-\d[\d,]*", "a setting: the top-k"),
    (r"\b(?:SmolLM2-135M(?:-Instruct)?|Llama-3\.1-8B(?:-Instruct)?|0\.88B)\b", "a model name"),
    (r"\bH200\b|\bx86_64\b", "hardware name"),
    (r"cut to \d+ characters|\d+ MinHash values|\d+ bands of \d+|>= 0\.8\b", "a setting of the report (ntk_ray/report.py)"),
    (r"#\d+\b", "an issue or pull-request number"),
    (r"max_restarts > 0", "Ray's own message, quoted"),
    (r"\b135M\b", "a model size in its name (SmolLM2-135M)"),
    (r"1\.5x (?:target|of)|within 1\.5x|>= 10x|<= 1\.5x|10x the", "a target (stated by the issue), not a measurement"),
    (r"\(the paper reports > 0\.99\)|> 0\.99", "the paper's own figure, quoted"),
]

NUMBER = re.compile(r"(?<![\w.^/])(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[+-]?\d+)?)([A-Za-z_]\w*)?(?![\w^])")
#: what may follow a number directly and leave it a quantity ("13.9x", "4.3s", "100K", "2,502 MiB")
UNITS = {"x", "s", "ms", "K", "M", "GiB", "MiB", "GB", "MB", "h", "min"}
FILE_REF = re.compile(r"(?:benchmarks/)?results/([\w.-]+\.md)")
LABEL = re.compile(r"measured\s+at\s+`?([0-9a-f]{7,40})`?")


@dataclass
class Claim:
    file: str
    line: int
    value: str
    text: str
    status: str = "UNMATCHED"
    where: str = ""


@dataclass
class Block:
    start: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_table(self) -> bool:
        return bool(self.lines) and all(line.lstrip().startswith("|") for line in self.lines)


def numbers_in(text: str) -> list[tuple[str, int, int]]:
    """(number, start, end) of every number outside inline code and outside an allowed span."""
    masked = re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), text)
    masked = re.sub(r"\]\([^)]*\)", lambda m: " " * len(m.group()), masked)  # link targets
    for pattern, _ in ALLOW:
        masked = re.sub(pattern, lambda m: " " * len(m.group()), masked)
    out = []
    for m in NUMBER.finditer(masked):
        if m.group(3) and m.group(3) not in UNITS:
            continue  # part of a name (SmolLM2-135M, 8B, q_proj), not a quantity
        sign = m.group(1) if (m.start() == 0 or masked[m.start() - 1] in " (|\t") else ""
        out.append((sign + m.group(2), m.start(), m.end()))
    return out


def as_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def decimals(s: str) -> int:
    s = s.replace(",", "")
    if "e" in s.lower():
        return -1
    return len(s.split(".")[1]) if "." in s else 0


def matches(claim: str, candidate: str) -> bool:
    """``candidate`` (from a results file) equals ``claim`` or rounds to it at the claim's precision."""
    a, b = as_float(claim), as_float(candidate)
    if a is None or b is None:
        return False
    if a == b:
        return True
    places = decimals(claim)
    if places < 0:
        return abs(a - b) <= 0.5 * 10 ** (int(f"{abs(a):e}".split("e")[1]) - len(claim.split("e")[0].replace(".", "").lstrip("-")) + 1)
    if decimals(candidate) <= places:
        return False  # a less precise file number never backs a more precise claim
    return abs(round(b, places) - a) < 10 ** -(places + 3) or abs(abs(b) - abs(a)) <= 0.5 * 10 ** -places and (a < 0) == (b < 0)


def find_in_results(value: str, files: list[Path]) -> str | None:
    for path in files:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in NUMBER.finditer(line):
                if matches(value, m.group(1) + m.group(2) if value.startswith("-") else m.group(2)):
                    return f"{path.relative_to(path.parents[2]) if len(path.parents) > 2 else path}:{no}"
    return None


def parse(path: Path):
    """(heading level, section heading, [blocks]) in file order; fenced code is dropped."""
    sections: list[tuple[int, str, list[Block]]] = [(0, "", [])]
    in_code = False
    block: Block | None = None
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
            block = None
            continue
        if in_code:
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        if heading:
            sections.append((len(heading.group(1)), heading.group(2).strip(), []))
            block = None
            continue
        if not line.strip():
            block = None
            continue
        is_table = line.lstrip().startswith("|")
        if block is None or block.is_table != is_table:
            block = Block(no)
            sections[-1][2].append(block)
        block.lines.append(line)
    return sections


def section_skip_reason(heading: str) -> str | None:
    for name, reason in SKIP_SECTIONS.items():
        if heading == name or heading.startswith(name + " ("):
            return reason
    return None


def check(paths: list[Path], results: Path) -> list[Claim]:
    claims: list[Claim] = []
    for path in paths:
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        enclosing: dict[int, list[str]] = {}
        for level, heading, blocks in parse(path):
            own = sorted(set(FILE_REF.findall(heading)) | {f for b in blocks for f in FILE_REF.findall(b.text)})
            enclosing = {k: v for k, v in enclosing.items() if k < level}
            section_files = own or next((enclosing[k] for k in sorted(enclosing, reverse=True) if enclosing[k]), [])
            enclosing[level] = section_files
            if section_skip_reason(heading):
                continue
            for i, block in enumerate(blocks):
                files = FILE_REF.findall(block.text)
                label = LABEL.search(block.text)
                if block.is_table and i > 0:  # the caption: the paragraph before the table
                    files += FILE_REF.findall(blocks[i - 1].text)
                    label = label or LABEL.search(blocks[i - 1].text)
                names = list(dict.fromkeys(files)) or section_files
                candidates = [results / n for n in names if (results / n).exists()]
                for k, line in enumerate(block.lines):
                    if block.is_table and re.match(r"\s*\|[\s:|-]+\|\s*$", line):
                        continue
                    for value, _, _ in numbers_in(line):
                        c = Claim(rel, block.start + k, value, line.strip())
                        if label:
                            c.status, c.where = "LABELLED", f"measured at {label.group(1)}"
                        else:
                            found = find_in_results(value, candidates)
                            if found:
                                c.status, c.where = "MATCHED", found
                            elif not candidates:
                                c.where = "no results file named by this paragraph, table caption or section"
                            else:
                                c.where = "not in " + ", ".join(str(p.name) for p in candidates)
                        claims.append(c)
    return claims


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help=f"Markdown files (default: {' '.join(DEFAULT_FILES)})")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="the results directory")
    p.add_argument("--quiet", action="store_true", help="print only the unmatched numbers and the summary")
    args = p.parse_args(argv)
    paths = [Path(f).resolve() for f in args.files] or [ROOT / f for f in DEFAULT_FILES]
    claims = check(paths, Path(args.results).resolve())
    for c in claims:
        if not args.quiet or c.status == "UNMATCHED":
            print(f"{c.status:9} {c.file}:{c.line}: {c.value} -> {c.where}")
    counts = {s: sum(c.status == s for c in claims) for s in ("MATCHED", "LABELLED", "UNMATCHED")}
    print(f"{len(claims)} numbers: {counts['MATCHED']} matched in a results file, {counts['LABELLED']} labelled "
          f"with the commit they were measured at, {counts['UNMATCHED']} unmatched")
    if counts["UNMATCHED"]:
        print("unmatched (each needs a results file with the command that produced it, a 'measured at <commit>' "
              "label, or removal):", file=sys.stderr)
        for c in claims:
            if c.status == "UNMATCHED":
                print(f"  {c.file}:{c.line}: {c.value}: {c.text[:120]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
