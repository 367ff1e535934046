"""Strict parsing of an LLM's intent list, with tolerant and recorded repair.

`parse_intents(raw)` turns raw model text into `[{"intent": str, "confidence": float}]`.
The reply may carry reasoning before the JSON (the prompts ask for step-by-step work),
code fences, trailing chatter, single quotes, trailing commas, or be cut off by the token
limit. Each repair that was needed is named in `Parsed.repairs`; a reply that cannot be
read is `ok=False` with a `reason`, for the caller to record (never to drop).

Which JSON counts: the last `{...}` that holds an "intents" key and parses as is; failing
that, the last one after repair; failing that, a bare list of intent objects or a single
`{"intent": ...}` object (small models often answer so). Text the item itself contributed
(e.g. a title saying "ignore previous instructions") can only ever be read as intent text.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MAX_INTENT_CHARS = 160
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_MISSING_BRACE = re.compile(r"(\}\s*,\s*)(\"intent\"\s*:)")  # `}, "intent": ...` (small models drop the `{`)
_CLOSER = {"{": "}", "[": "]"}


@dataclass(frozen=True)
class Parsed:
    intents: list[dict[str, float | str]]  # [{"intent": str, "confidence": float in [0, 1]}]
    ok: bool
    reason: str = ""                       # why it failed ("" when ok)
    repairs: tuple[str, ...] = ()          # what had to be repaired or defaulted


def _scan(text: str) -> tuple[list[str], bool, list[tuple[int, tuple[str, ...]]]]:
    """Bracket stack at the end, whether the end is inside a string, and every position where
    a bracket closed with the stack left after it (string-aware, double quotes only)."""
    stack: list[str] = []
    closes: list[tuple[int, tuple[str, ...]]] = []
    in_str = esc = False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]" and stack and _CLOSER[stack[-1]] == ch:
            stack.pop()
            closes.append((i, tuple(stack)))
            if not stack:
                break
    return stack, in_str, closes


def close_truncated(text: str) -> str | None:
    """JSON cut off mid-way -> the longest prefix that ends on a closed element, closed up.
    A half-written last element is dropped rather than guessed. None if nothing is closable."""
    stack, in_str, closes = _scan(text)
    if not stack and not in_str:
        return None
    cut = [(i, s) for i, s in closes if s]  # closed an inner element, outer ones still open
    if cut:
        i, rest = cut[-1]
        return text[: i + 1] + "".join(_CLOSER[c] for c in reversed(rest))
    body = text.rstrip()
    if in_str:
        return None  # cut inside the very first string: nothing complete to keep
    body = body.rstrip(",:")
    return body + "".join(_CLOSER[c] for c in reversed(stack))


def single_to_double_quotes(text: str) -> str:
    """Python-style {'intent': 'x'} -> JSON; apostrophes inside double-quoted strings are kept."""
    out: list[str] = []
    quote = ""
    esc = False
    for ch in text:
        if quote:
            if esc:
                out.append("'" if ch == "'" and quote == "'" else "\\" + ch)
                esc = False
                continue
            if ch == "\\":
                esc = True
                continue
            if ch == quote:
                out.append('"')
                quote = ""
            elif ch == '"' and quote == "'":
                out.append('\\"')
            else:
                out.append(ch)
        elif ch in "'\"":
            quote = ch
            out.append('"')
        else:
            out.append(ch)
    return "".join(out)


def _decode_at(text: str, start: int) -> tuple[object | None, str, list[str]]:
    """Decode the JSON value starting at `start`, repairing if needed: (value, error, repairs)."""
    dec = json.JSONDecoder()
    try:
        value, end = dec.raw_decode(text, start)
        return value, "", (["trailing text after JSON"] if text[end:].strip().strip("`").strip() else [])
    except json.JSONDecodeError as e:
        first_error = f"invalid JSON: {e.msg} at char {e.pos - start}"
    candidate = text[start:]
    repairs: list[str] = []
    for name, fix in (("single quotes", single_to_double_quotes),
                      ("trailing comma", lambda s: _TRAILING_COMMA.sub(r"\1", s)),
                      ("missing '{' before an intent", lambda s: _MISSING_BRACE.sub(r"\1{\2", s)),
                      ("closed truncated JSON", close_truncated)):
        fixed = fix(candidate)
        if fixed is None or fixed == candidate:
            continue
        candidate = fixed
        repairs.append(name)
        try:
            value, _ = dec.raw_decode(candidate)
            return value, "", repairs
        except json.JSONDecodeError:
            continue
    return None, first_error, []


def _candidates(text: str) -> list[int]:
    """Start offsets of `{` that open an object containing an "intents" key, last first."""
    starts = []
    for m in re.finditer(r"""["']intents["']\s*:""", text):
        brace = text.rfind("{", 0, m.start())
        if brace >= 0 and brace not in starts:
            starts.append(brace)
    return starts[::-1]


def _extract(text: str) -> tuple[object | None, str, list[str]]:
    starts = _candidates(text)
    for s in starts:  # a clean parse anywhere beats a repaired one
        try:
            value, end = json.JSONDecoder().raw_decode(text, s)
            trailing = text[end:].strip().strip("`").strip()
            return value, "", (["trailing text after JSON"] if trailing else [])
        except json.JSONDecodeError:
            continue
    first_error = ""
    for s in starts:
        value, err, repairs = _decode_at(text, s)
        if value is not None:
            return value, "", repairs
        first_error = first_error or err
    if first_error:
        return None, first_error, []
    for opener, note in (("[", "bare list"), ("{", "single intent object")):
        m = re.search(r"\[\s*\{\s*[\"']intent[\"']" if opener == "[" else r"\{\s*[\"']intent[\"']", text)
        if m:
            value, err, repairs = _decode_at(text, m.start())
            if value is not None:
                return value, "", [note, *repairs]
            first_error = first_error or err
    return None, first_error or "no JSON object with an 'intents' key", []


def _confidence(value: object, default: float, repairs: list[str], label: str) -> float:
    if value is None:
        repairs.append(f"{label}: confidence missing, set to {default}")
        return default
    if isinstance(value, str):
        s = value.strip()
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
            repairs.append(f"{label}: confidence given as text")
        except ValueError:
            repairs.append(f"{label}: confidence {s[:20]!r} unreadable, set to {default}")
            return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        repairs.append(f"{label}: confidence {str(value)[:20]!r} invalid, set to {default}")
        return default
    if not 0.0 <= value <= 1.0:
        clamped = min(1.0, max(0.0, float(value)))
        repairs.append(f"{label}: confidence {value:g} clamped to {clamped:g}")
        return clamped
    return float(value)


def normalise_intent(text: str) -> str:
    """Whitespace collapsed, surrounding quotes and full stops dropped, length capped."""
    return re.sub(r"\s+", " ", text).strip().strip("\"'").rstrip(".").strip()[:MAX_INTENT_CHARS]


def parse_intents(raw: str, max_intents: int = 8, default_confidence: float = 0.5) -> Parsed:
    """Raw LLM text -> Parsed([{intent, confidence}], ok, reason, repairs)."""
    if not raw or not raw.strip():
        return Parsed([], False, "empty output")
    text, repairs = raw, []
    fences = [f for f in _FENCE.findall(raw) if "intent" in f]
    if fences:
        text = fences[-1]
        repairs.append("code fence")
    value, err, fixes = _extract(text)
    if value is None:
        return Parsed([], False, err)
    repairs += fixes
    if isinstance(value, dict) and "intents" in value:
        items = value["intents"]
    elif isinstance(value, dict) and "intent" in value:
        items = [value]
    else:
        items = value
    if not isinstance(items, list):
        return Parsed([], False, f"'intents' is a {type(items).__name__}, not a list")
    best: dict[str, dict[str, float | str]] = {}
    for k, el in enumerate(items):
        label = f"intent {k}"
        if isinstance(el, str):
            el = {"intent": el}
        text_value = el.get("intent") if isinstance(el, dict) else None
        if not isinstance(text_value, str) or not normalise_intent(text_value):
            repairs.append(f"{label}: no intent text, skipped")
            continue
        conf = _confidence(el.get("confidence"), default_confidence, repairs, label)
        intent = normalise_intent(text_value)
        key = intent.lower()
        if key in best:
            repairs.append(f"{label}: duplicate of an earlier intent, merged")
            best[key]["confidence"] = max(float(best[key]["confidence"]), conf)
        else:
            best[key] = {"intent": intent, "confidence": conf}
    out = list(best.values())
    if not out:
        return Parsed([], False, "no usable intents", tuple(repairs))
    if len(out) > max_intents:
        repairs.append(f"kept the {max_intents} most confident of {len(out)} intents")
        out = sorted(out, key=lambda d: -float(d["confidence"]))[:max_intents]
    return Parsed(out, True, "", tuple(repairs))
