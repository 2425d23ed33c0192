#!/usr/bin/env python3
"""Build the bundled demo corpus ``ntk_ray/demo/wordnet_glosses.parquet`` from WordNet 3.0.

One row per synset with a non-empty gloss: an instruction asking for the meaning of the
synset's first word, the gloss definition (plus its example sentences) as the response, and
the synset's lexicographer file name (``noun.food``, ``verb.motion``, ...) as the label.

Source: Debian's ``wordnet-base`` package (``apt-get install -y wordnet-base``), whose files
live in ``/usr/share/wordnet``. Debian does not ship the ``lexnames`` file, so the fixed
WordNet 3.0 table (from the lexnames(5WN) manual page) is built in and used when the file
is missing.

The output is deterministic: rows are sorted by id, prompt templates and subsampling are
chosen by a hash of the id. When the full corpus would exceed ``--max-bytes``, rows are kept
when their id hash falls below a sampling rate (a multiple of 0.05, the largest that fits),
and every label additionally keeps its ``--min-per-label`` rows of lowest hash.

Usage::

    python scripts/build_demo_corpus.py [--wordnet-dir /usr/share/wordnet] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
from pathlib import Path

import polars as pl

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "ntk_ray" / "demo" / "wordnet_glosses.parquet"

# WordNet 3.0 lexicographer files, number -> name (lexnames(5WN)).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]

# data file suffix -> (id letter, pos column value, word used in prompts)
POS_FILES = {
    "noun": ("n", "noun", "noun"),
    "verb": ("v", "verb", "verb"),
    "adj": ("a", "adj", "adjective"),
    "adv": ("r", "adv", "adverb"),
}

PROMPT_TEMPLATES = [
    'What does "{lemma}" mean?',
    'Define the {posword} "{lemma}".',
    'Explain the meaning of the {posword} "{lemma}".',
    'Give a short definition of "{lemma}".',
    'What is meant by the {posword} "{lemma}"?',
    'In plain English, what does "{lemma}" mean?',
]

COLUMNS = ["id", "label", "pos", "lemma", "prompt", "response", "text"]

# A gloss is "definition; "example one"; "example two"". The examples start at the first
# quote that follows a ';' or ':'; glosses without such a quote are all definition.
_EXAMPLES_START = re.compile(r'[;:]\s*"')
_QUOTED = re.compile(r'"([^"]+)"')
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def stable_hash(text: str, salt: str = "") -> int:
    """A platform-independent 64-bit hash of ``salt + text``."""
    digest = hashlib.blake2b((salt + text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def read_lexnames(wordnet_dir: Path) -> list[str]:
    """Lexicographer file names by number: from ``lexnames`` if present, else built in."""
    path = wordnet_dir / "lexnames"
    if not path.exists():
        return list(LEXNAMES)
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            names[int(fields[0])] = fields[1]
    return [names[i] for i in range(max(names) + 1)]


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted example sentences."""
    gloss = gloss.strip()
    match = _EXAMPLES_START.search(gloss)
    if match is None:
        return gloss.rstrip("; ").strip(), []
    definition = gloss[: match.start()].rstrip("; ").strip()
    examples = [e.strip() for e in _QUOTED.findall(gloss[match.start():]) if e.strip()]
    return definition, examples


def parse_data_line(line: str, lexnames: list[str]) -> tuple[int, str, str, str] | None:
    """Parse one synset line: (offset, label, first lemma, gloss), or None for headers."""
    if not line or line.startswith(" ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    offset, lex_filenum = int(fields[0]), int(fields[1])
    word = _ADJ_MARKER.sub("", fields[4]).replace("_", " ")
    return offset, lexnames[lex_filenum], word, gloss


def make_row(id_: str, label: str, pos: str, posword: str, lemma: str, gloss: str) -> dict | None:
    """Build one corpus row, or None when the gloss has no usable text."""
    definition, examples = split_gloss(gloss)
    if not definition:
        return None
    template = PROMPT_TEMPLATES[stable_hash(id_, "template:") % len(PROMPT_TEMPLATES)]
    prompt = template.format(lemma=lemma, posword=posword)
    response = "\n".join([definition] + [f"Example: {e}" for e in examples])
    return {
        "id": id_, "label": label, "pos": pos, "lemma": lemma,
        "prompt": prompt, "response": response, "text": f"{prompt}\n{response}",
    }


def read_wordnet(wordnet_dir: Path) -> pl.DataFrame:
    """All synsets with a non-empty definition, sorted by id."""
    lexnames = read_lexnames(wordnet_dir)
    rows = []
    for suffix, (letter, pos, posword) in POS_FILES.items():
        path = wordnet_dir / f"data.{suffix}"
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                parsed = parse_data_line(line.rstrip("\n"), lexnames)
                if parsed is None:
                    continue
                offset, label, lemma, gloss = parsed
                row = make_row(f"wn:{letter}:{offset:08d}", label, pos, posword, lemma, gloss)
                if row is not None:
                    rows.append(row)
    return pl.DataFrame(rows, schema={c: pl.String for c in COLUMNS}).sort("id")


def subsample(df: pl.DataFrame, rate: float, min_per_label: int) -> pl.DataFrame:
    """Keep rows whose id hash is below ``rate``, plus each label's lowest-hash rows."""
    if rate >= 1.0:
        return df
    u = pl.Series([stable_hash(i, "sample:") / 2**64 for i in df["id"]])
    ranked = df.with_columns(_u=u).with_columns(
        _r=pl.col("_u").rank("ordinal").over("label")
    )
    keep = (pl.col("_u") < rate) | (pl.col("_r") <= min_per_label)
    return ranked.filter(keep).drop("_u", "_r")


def parquet_bytes(df: pl.DataFrame) -> bytes:
    """The parquet file for ``df`` (zstd, statistics on), as bytes."""
    buffer = io.BytesIO()
    df.write_parquet(buffer, compression="zstd", compression_level=19, statistics=True)
    return buffer.getvalue()


def build(wordnet_dir: Path, max_bytes: int, min_per_label: int) -> tuple[pl.DataFrame, bytes, float]:
    """Read WordNet and find the largest sampling rate (0.05 steps) that fits ``max_bytes``."""
    full = read_wordnet(wordnet_dir)
    data = parquet_bytes(full)
    if len(data) <= max_bytes:
        return full, data, 1.0
    # Start from the proportional estimate and step down (the per-label floors add rows).
    start = min(19, int(20 * max_bytes / len(data)))
    for step in range(start, 0, -1):
        rate = step / 20
        df = subsample(full, rate, min_per_label)
        data = parquet_bytes(df)
        if len(data) <= max_bytes:
            return df, data, rate
    raise SystemExit(f"cannot fit the corpus into {max_bytes} bytes even at rate 0.05")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--min-per-label", type=int, default=300)
    args = parser.parse_args(argv)

    if not (args.wordnet_dir / "data.noun").exists():
        print(f"error: no WordNet data files in {args.wordnet_dir} "
              "(apt-get install -y wordnet-base, or pass --wordnet-dir)", file=sys.stderr)
        return 2
    df, data, rate = build(args.wordnet_dir, args.max_bytes, args.min_per_label)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)

    print(f"wrote {args.out} ({len(data)} bytes, {df.height} rows, sampling rate {rate:.2f}, "
          f"min {args.min_per_label} per label)")
    counts = df.group_by("label").len().sort(["len", "label"], descending=[True, False])
    for label, n in counts.iter_rows():
        print(f"{label:22s} {n:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
