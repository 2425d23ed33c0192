"""Hugging Face datasets in and out, without the ``datasets`` package.

In: besides files, directories and globs, an input path (``--pool``, ``--domain``, ``--data``)
may be one of these; :func:`expand` turns it into the files (or glob patterns) it stands for,
which :func:`ntk_ray.io.paths.resolve_paths` then resolves as any other, so row numbers, ids
(``<file>:<row>``), rejects and the read-back of ``selected.parquet`` work unchanged.

* A ``save_to_disk`` directory of a ``datasets.Dataset``: ``state.json``, ``dataset_info.json``
  and ``data-XXXXX-of-YYYYY.arrow`` (Arrow IPC streams, read by :class:`ntk_ray.io.formats.Arrow`):
  the files ``state.json`` lists, in its order.
* A ``save_to_disk`` directory of a ``datasets.DatasetDict``: ``dataset_dict.json`` and one
  such directory per split.
* A dataset repository: a snapshot directory (``huggingface_hub.snapshot_download``, a git
  clone) or ``hf://datasets/owner/name[@revision]`` (the hub's fsspec file system,
  ``huggingface_hub.HfFileSystem``, through :func:`ntk_ray.io.fs.filesystem`), recognised by
  its dataset card: a ``README.md`` that starts with a YAML block. Its files are those the
  card's ``configs:`` section names (``data_files``, relative to ``data_dir``) for the chosen
  config and split. Without a ``configs:`` section (or a config without ``data_files``) they
  are found by name as ``datasets.load_dataset`` finds them: the data files of the repository
  (of its most common format), split by ``data/{split}-00000-of-00001.*`` names, else by a
  directory name, else by a file name holding train/training, validation/valid/dev/val or
  test/testing/eval/evaluation, else all of them are ``train``.

Splits: ``SOURCE:SPLIT`` names one, ``SOURCE:CONFIG:SPLIT`` a config of a repository that has
several. Without a name, ``train`` is used, or the only split there is; anything else (a split
or config that is not there, several splits and none named ``train``, a name after a plain
directory) is an :class:`InputError` line listing what there is. A path inside a repository
(``hf://datasets/o/n/data/train-*.parquet``) is an ordinary file or glob.

Out: :func:`save_to_disk` writes a table as a ``save_to_disk`` directory (``select
--save-hf DIR``): what ``datasets.load_from_disk(DIR)`` loads, ready for ``.push_to_hub()``.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ntk_ray.io import formats
from ntk_ray.io.fs import InputError, filesystem, is_uri, split_query

__all__ = ["SPLIT_KEYWORDS", "check_save_target", "expand", "save_to_disk", "split_by_name"]

#: ``datasets``' split names in file and directory names (``datasets.data_files.SPLIT_KEYWORDS``)
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"  # what may stand next to a split keyword in a name
_SHARDED = re.compile(r"data/([^/]*)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*")  # push_to_hub's data/{split}-...
_SPLIT_NAME = re.compile(r"\w+(\.\w+)*\Z")  # datasets' _split_re
_NAME = re.compile(r"[A-Za-z0-9_][\w.\-]*\Z")  # a split or config name after ':'
#: files of a repository that are never data (``datasets.data_files.FILES_TO_IGNORE``)
_NOT_DATA = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}
_ARROW_SHARD = re.compile(r"data-[0-9]{5}-of-[0-9]{5}\.arrow\Z")


class _Dir:
    """A directory, local or URI: its children and the text of its files."""

    def __init__(self, spec: str, fs: pafs.FileSystem, path: str) -> None:
        self.spec = spec
        self.fs, self.path = fs, path.rstrip("/") or path

    @classmethod
    def at(cls, spec: str) -> _Dir | None:
        """The directory ``spec``, or None when it is not one (a file, nothing, a bad URI)."""
        if is_uri(spec) and ("*" in split_query(spec)[0] or "[" in split_query(spec)[0]):
            return None
        if not is_uri(spec) and not os.path.isdir(os.path.expanduser(spec)):
            return None
        try:
            fs, path = filesystem(spec)
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                return None
        except (InputError, OSError, pa.ArrowException):
            return None
        return cls(spec, fs, path)

    def child(self, rel: str, pattern: bool = False) -> str:
        """The path (URI) of ``rel`` below this directory; a ``pattern`` keeps its wildcards."""
        if not is_uri(self.spec):
            return os.path.join(self.spec, *rel.split("/"))
        head, query = split_query(self.spec)
        return head.rstrip("/") + "/" + urllib.parse.quote(rel, safe="/*?[]!" if pattern else "/") + query

    def sub(self, rel: str) -> _Dir:
        return _Dir(self.child(rel), self.fs, self.path + "/" + rel)

    def types(self, *names: str) -> list[pafs.FileType]:
        infos = self.fs.get_file_info([self.path + "/" + n for n in names])
        return [info.type for info in infos]

    def is_file(self, name: str) -> bool:
        return self.types(name)[0] == pafs.FileType.File

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path + "/" + name) as f:
            return f.read().decode("utf-8-sig")

    def files(self, recursive: bool = True) -> list[str]:
        """Paths (relative, '/'-separated) of the files below, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        base = self.path + "/"
        return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def _split_suffix(spec: str) -> tuple[_Dir | None, list[str]]:
    """The directory of ``spec`` and the names after it: ``DIR`` -> (DIR, []), ``DIR:test`` ->
    (DIR, ["test"]), ``DIR:cfg:test`` -> (DIR, ["cfg", "test"]); (None, []) when no prefix of
    ``spec`` is a directory."""
    directory = _Dir.at(spec)
    if directory is not None:
        return directory, []
    rest, names = spec, []
    for _ in range(2):
        head, sep, name = rest.rpartition(":")
        if not sep or not head or not _NAME.match(name):
            break
        names.insert(0, name)
        rest = head
        directory = _Dir.at(rest)
        if directory is not None:
            return directory, names
    return None, []


def _json(directory: _Dir, name: str, flag: str) -> dict:
    try:
        value = json.loads(directory.read_text(name))
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputError(f"{flag}: {directory.child(name)} is not readable JSON: {formats.one_line(exc)}") from exc
    if not isinstance(value, dict):
        raise InputError(f"{flag}: {directory.child(name)} is not a JSON object")
    return value


def _card(directory: _Dir, flag: str) -> dict | None:
    """The YAML block at the top of ``README.md`` (a dataset card), or None when there is none."""
    import yaml

    try:
        text = directory.read_text("README.md")
    except (OSError, pa.ArrowException, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if not lines or lines[0].rstrip() != "---":
        return None
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if end is None:
        return None
    try:
        card = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        raise InputError(f"{flag}: {directory.child('README.md')}: the YAML block of the dataset card cannot be "
                         f"read: {formats.one_line(exc)}") from exc
    return card if isinstance(card, dict) else {}


def _choose(available: list[str], wanted: str | None, what: str, where: str, flag: str, spell: str) -> str:
    """``wanted``, else ``train`` (or ``default`` for configs), else the only one; else an error
    listing ``available``. ``spell``: how to name one (``DIR:SPLIT``)."""
    listing = ", ".join(available) or "none"
    if wanted is not None:
        if wanted in available:
            return wanted
        raise InputError(f"{flag}: {where} has no {what} '{wanted}' ({what}s: {listing})")
    default = "train" if what == "split" else "default"
    if default in available:
        return default
    if len(available) == 1:
        return available[0]
    raise InputError(f"{flag}: {where} has {what}s {listing} and none is '{default}': name one as {spell}")


# ---- save_to_disk directories -----------------------------------------------------------------

def _saved_dataset(directory: _Dir, names: list[str], flag: str) -> list[str]:
    """The ``.arrow`` files of a ``Dataset.save_to_disk`` directory, in ``state.json``'s order."""
    has_state, = directory.types("state.json")
    state = _json(directory, "state.json", flag) if has_state == pafs.FileType.File else None
    if names:
        split = f" (split '{state.get('_split')}')" if state and state.get("_split") else ""
        raise InputError(f"{flag}: {directory.spec} is one saved Dataset{split}, not a DatasetDict with splits: "
                         f"drop ':{':'.join(names)}'")
    if state is not None:
        entries = state.get("_data_files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                   for e in entries):
            raise InputError(f"{flag}: {directory.child('state.json')} has no list of _data_files")
        files = [e["filename"] for e in entries]
        for name, kind in zip(files, directory.types(*files) if files else []):
            if kind != pafs.FileType.File:
                raise InputError(f"{flag}: {directory.spec}: state.json lists {name}, which is not there "
                                 "(an incomplete copy of a save_to_disk directory?)")
    else:
        files = [f for f in directory.files(recursive=False) if _ARROW_SHARD.match(f)]
    if not files:
        raise InputError(f"{flag}: {directory.spec} has dataset_info.json but no data-*.arrow files: not a complete "
                         "datasets save_to_disk directory")
    return [directory.child(f) for f in files]


def _dataset_dict(directory: _Dir, names: list[str], flag: str) -> list[str]:
    """The files of one split of a ``DatasetDict.save_to_disk`` directory."""
    splits = _json(directory, "dataset_dict.json", flag).get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise InputError(f"{flag}: {directory.child('dataset_dict.json')} has no list of splits")
    if len(names) > 1:
        raise InputError(f"{flag}: {directory.spec} is a saved DatasetDict: it has splits, not configs "
                         f"(name a split as {directory.spec}:SPLIT)")
    split = _choose(splits, names[0] if names else None, "split", directory.spec, flag, f"{directory.spec}:SPLIT")
    sub = directory.sub(split)
    if not any(t == pafs.FileType.File for t in sub.types("state.json", "dataset_info.json")):
        raise InputError(f"{flag}: {sub.spec}: the split '{split}' of dataset_dict.json is not a saved Dataset "
                         "(no state.json)")
    return _saved_dataset(sub, [], flag)


# ---- repositories -----------------------------------------------------------------------------

def _keyword_regexes(where: str) -> dict[str, re.Pattern[str]]:
    """Per split, a regex over relative paths: ``where="dir"`` a directory name, ``"file"`` the
    file name holding one of the split's keywords (``datasets``' default patterns, fsspec >= 2023.12:
    ``**/{kw}[SEP]*`` and ``**/*[SEP]{kw}[SEP]*`` for file names, ``**/{kw}/**``,
    ``**/{kw}[SEP]*/**``, ``**/*[SEP]{kw}/**``, ``**/*[SEP]{kw}[SEP]*/**`` for directories)."""
    out = {}
    for split, words in SPLIT_KEYWORDS.items():
        kw = "(?:" + "|".join(words) + ")"
        if where == "dir":
            out[split] = re.compile(rf"(?:.*/)?(?:[^/]*{_SEP})?{kw}(?:{_SEP}[^/]*)?/.*")
        else:
            out[split] = re.compile(rf"(?:.*/)?(?:[^/]*{_SEP})?{kw}{_SEP}[^/]*")
    return out


def split_by_name(files: list[str]) -> dict[str, list[str]]:
    """The splits of a repository's data files (relative paths) by their names, as
    ``datasets.load_dataset`` finds them without a ``configs:`` section (``datasets.data_files.
    get_data_patterns``): the first rule that matches any file decides.

    1. ``data/{split}-00000-of-00001.*`` (what ``push_to_hub`` writes): the split is the name
       before the shard number;
    2. a directory name holding a split keyword (:data:`SPLIT_KEYWORDS`: ``train/``,
       ``data/test-v2/``, ...), for train, validation and test;
    3. a file name holding one (``train.jsonl``, ``my_test_0.parquet``);
    4. every file is ``train``.
    A keyword stands alone or next to one of ``-._ 0-9``; case matters. A file may match two
    splits of one rule (``train_test.csv``), and is then in both, as in ``datasets``.
    """
    sharded: dict[str, list[str]] = {}
    for f in files:
        m = _SHARDED.fullmatch(f)
        if m and _SPLIT_NAME.match(m.group(1)):
            sharded.setdefault(m.group(1), []).append(f)
    if sharded:
        order = [s for s in SPLIT_KEYWORDS if s in sharded] + sorted(set(sharded) - set(SPLIT_KEYWORDS))
        return {s: sharded[s] for s in order}
    for where in ("dir", "file"):
        regexes = _keyword_regexes(where)
        found = {s: [f for f in files if regexes[s].fullmatch(f)] for s in SPLIT_KEYWORDS}
        found = {s: fs for s, fs in found.items() if fs}
        if found:
            return found
    return {"train": list(files)} if files else {}


def _data_files(directory: _Dir, data_dir: str) -> list[str]:
    """The data files below ``data_dir`` (relative to it): a format of the registry, no '.' or
    '__' component, not a card or info file; only those of the most common format."""
    base = directory.sub(data_dir) if data_dir else directory
    files = [f for f in base.files() if not any(p.startswith((".", "__")) for p in f.split("/"))
             and f.rsplit("/", 1)[-1] not in _NOT_DATA and formats.format_for(f) is not None]
    if not files:
        return []
    counts = Counter(formats.format_for(f).name for f in files)
    order = [fmt.name for fmt in formats.FORMATS]
    top = max(counts, key=lambda name: (counts[name], -order.index(name)))
    return [f for f in files if formats.format_for(f).name == top]


def _data_files_patterns(value, where: str, flag: str) -> dict[str, list[str]]:
    """A config's ``data_files`` as split -> patterns (``datasets.data_files.sanitize_patterns``):
    a string or a list of strings is ``train``; a list of ``{split, path}``."""
    if isinstance(value, str):
        return {"train": [value]}
    if isinstance(value, dict):
        return {str(k): v if isinstance(v, list) else [v] for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {"train": list(value)}
    if isinstance(value, list) and all(isinstance(v, dict) and "split" in v and "path" in v for v in value):
        out: dict[str, list[str]] = {}
        for v in value:
            out.setdefault(str(v["split"]), []).extend(v["path"] if isinstance(v["path"], list) else [v["path"]])
        return out
    raise InputError(f"{flag}: {where}: data_files is neither a pattern, a list of patterns nor a list of "
                     "{split, path}")


def _repository(directory: _Dir, card: dict, names: list[str], flag: str) -> list[str]:
    """The files (or patterns) of one config and split of a dataset repository."""
    where = directory.spec
    configs = card.get("configs")
    if configs:
        if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
            raise InputError(f"{flag}: {directory.child('README.md')}: configs is not a list of entries with a "
                             "config_name")
        by_name = {str(c["config_name"]): c for c in configs}
        if len(names) == 2:
            config = _choose(list(by_name), names[0], "config", where, flag, f"{where}:CONFIG:SPLIT")
        else:
            marked = [str(c["config_name"]) for c in configs if c.get("default")]
            config = marked[0] if marked else _choose(list(by_name), None, "config", where, flag,
                                                      f"{where}:CONFIG:SPLIT")
        entry = by_name[config]
        data_dir = str(entry.get("data_dir") or "").strip("/")
        where = f"{where} (config '{config}')"
        if entry.get("data_files") is not None:
            patterns = _data_files_patterns(entry["data_files"], where, flag)
            split = _choose(list(patterns), names[-1] if names else None, "split", where, flag, f"{directory.spec}:SPLIT")
            return [p if is_uri(p) or os.path.isabs(p) else
                    directory.child("/".join(x for x in (data_dir, p.removeprefix("./")) if x),
                                    pattern=globlib.has_magic(p))
                    for p in patterns[split]]
    else:
        if len(names) == 2:
            raise InputError(f"{flag}: {where} has no configs: section in its README.md, so there is no config "
                             f"'{names[0]}' (name a split as {where}:SPLIT)")
        data_dir = ""
    files = _data_files(directory, data_dir)
    if not files:
        raise InputError(f"{flag}: {where} is a dataset repository without {formats.suffix_list()} data files")
    splits = split_by_name(files)
    split = _choose(list(splits), names[-1] if names else None, "split", where, flag, f"{directory.spec}:SPLIT")
    return [directory.child("/".join(x for x in (data_dir, f) if x)) for f in splits[split]]


# ---- the entry point --------------------------------------------------------------------------

def expand(spec: str, flag: str) -> list[str] | None:
    """The input files (or glob patterns) a Hugging Face dataset source stands for (see the
    module docstring), or None when ``spec`` is not one (a file, a glob, a plain directory,
    nothing at all): :func:`ntk_ray.io.paths.resolve_paths` then treats it as before.

    Raises:
        InputError: one line naming ``flag`` and the source, e.g. ``--pool: runs/ds has no
            split 'dev' (splits: train, test)``.
    """
    directory, names = _split_suffix(spec)
    if directory is None:
        return None
    kinds = dict(zip(("dict", "state", "info", "readme"),
                     (t == pafs.FileType.File for t in directory.types(
                         "dataset_dict.json", "state.json", "dataset_info.json", "README.md"))))
    card = _card(directory, flag) if kinds["readme"] else None
    if kinds["dict"]:
        return _dataset_dict(directory, names, flag)
    if kinds["state"] or (kinds["info"] and card is None):
        return _saved_dataset(directory, names, flag)
    if card is not None:
        return _repository(directory, card, names, flag)
    if names:
        raise InputError(f"{flag}: {spec}: {directory.spec} is not a Hugging Face dataset (no dataset_dict.json, "
                         f"state.json or dataset card README.md), so ':{':'.join(names)}' names no split")
    return None


# ---- out: a save_to_disk directory ------------------------------------------------------------

#: ``state.json``'s ``_fingerprint`` of a directory written here starts with this: only such a
#: directory is replaced by the next :func:`save_to_disk` into it
FINGERPRINT_PREFIX = "ntk-ray-"
SHARD_BYTES = 500 << 20  # datasets' default max_shard_size


def _ours(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and str(state.get("_fingerprint", "")).startswith(FINGERPRINT_PREFIX)


def check_save_target(target: str, flag: str = "--save-hf", out: str | None = None) -> None:
    """Refuse (one InputError line) a target that is a URI, an existing file, an existing
    non-empty directory that :func:`save_to_disk` did not write (a user's dataset, the pool
    itself), or ``out`` (the run's ``--out``) or a directory above it; a directory it wrote is
    replaced."""
    if is_uri(target):
        raise InputError(f"{flag} {target}: a local directory is needed (then "
                         "datasets.load_from_disk(DIR).push_to_hub(...))")
    path = Path(target).expanduser()
    if out and not is_uri(out):
        here, there = path.absolute(), Path(out).expanduser().absolute()
        if here == there or here in there.parents:
            raise InputError(f"{flag} {target} is --out or holds it: choose a directory of its own (inside --out is fine)")
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {target} is an existing file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not _ours(path):
        raise InputError(f"{flag} {target} is a non-empty directory that ntk-ray did not write: choose a new or "
                         "empty directory")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_to_disk(table: pa.Table, target: str, *, description: str = "", flag: str = "--save-hf") -> Path:
    """Write ``table`` as a ``datasets`` ``save_to_disk`` directory: ``data-XXXXX-of-YYYYY.arrow``
    (Arrow IPC streams of at most about :data:`SHARD_BYTES` each, rows in order), ``state.json``
    and ``dataset_info.json`` (features left to ``datasets`` to infer from the Arrow schema).

    Atomic: written into a temporary directory next to ``target`` and renamed into place; a
    directory this function wrote before is replaced (moved aside, then deleted), anything else
    non-empty is refused (:func:`check_save_target`). Returns the target's path."""
    from ntk_ray.io.atomic import fsync_dir

    check_save_target(target, flag)
    path = Path(target).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = path.with_name(f".{path.name}.tmp-{tag}"), path.with_name(f".{path.name}.old-{tag}")
    table = table.replace_schema_metadata(None)
    shards = max(1, min(table.num_rows, -(-table.nbytes // SHARD_BYTES)))
    bounds = [table.num_rows * i // shards for i in range(shards + 1)]
    digest = hashlib.sha256()
    try:
        tmp.mkdir()
        names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
        for name, lo, hi in zip(names, bounds, bounds[1:]):
            with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(lo, hi - lo), max_chunksize=1000)
            digest.update((tmp / name).read_bytes())
            _fsync(tmp / name)
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": FINGERPRINT_PREFIX + digest.hexdigest()[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        info = {"citation": "", "description": description, "features": None, "homepage": "", "license": ""}
        for name, obj in (("state.json", state), ("dataset_info.json", info)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            _fsync(tmp / name)
        fsync_dir(tmp)
        if path.exists():
            check_save_target(target, flag)  # still ours (or empty) just before it is moved aside
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path
