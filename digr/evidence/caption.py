"""Caption stage (CMSA, DeepInterestGR): a recommendation-focused caption per item image, on Ray Data.

Two paths, chosen by `caption.mode`:
- `tags` (CPU): no VLM runs offline on CPU, so the evidence is the title plus the ImageNet
  tags `digr.evidence.images` gave the photo; a small LLM (any `digr.evidence.llm` backend, SmolLM2-135M-Instruct
  through `transformers` by default) writes one sentence on who would buy it and why.
- `vlm` (GPU): a VLM (Qwen2.5-VL class) sees the photo itself, through Ray Data's vLLM
  processor (`vLLMEngineProcessorConfig` + `build_processor`, the multimodal stage enabled);
  vLLM is imported only by Ray's engine actors, so the processor builds without it.

Pure core: `render_item` (title + tags -> the prompt's {item} lines), `caption_messages`,
`vlm_messages` (image as a data URL, fetched through `digr.evidence.images`), `clean_caption`.
Only items whose image is ok are captioned; every other item gets a null caption and an
explicit status, never a caption made up from the title alone.

Artifact: captions.parquet (item_idx, item_id, caption or null, status ok | no_image |
image_failed | failed, error, source, prompt_version).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from digr.evidence.images import ENCODER_KEY, ImagesConfig, decode_image, fetch_image_bytes
from digr.evidence.llm import (
    LLMConfig,
    TransformersSettings,
    VLLMPostprocess,
    VLLMPreprocess,
    VLLMSettings,
    build_backend,
    vllm_processor_config,
)
from digr.evidence.mine import PromptTemplate, load_prompt
from digr.platform import storage

MODES = ("tags", "vlm")
STATUSES = ("ok", "no_image", "image_failed", "failed")
CAPTIONS_SCHEMA = pa.schema([
    ("item_idx", pa.int32()), ("item_id", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("source", pa.string()), ("prompt_version", pa.string()),
])


def _default_llm() -> LLMConfig:
    # Captions are prose: the JSON stop would never fire, and 60 tokens hold two sentences.
    return LLMConfig(max_new_tokens=60, batch_size=8, transformers=TransformersSettings(stop_at_json=False))


def _default_vlm() -> LLMConfig:
    return LLMConfig(backend="vllm", model="Qwen/Qwen2.5-VL-3B-Instruct", max_new_tokens=96, batch_size=16,
                     vllm=VLLMSettings(guided_json=False, engine_kwargs={"limit_mm_per_prompt": {"image": 1}}))


@dataclass(frozen=True)
class CaptionConfig:
    mode: str = "tags"              # tags (CPU: ImageNet tags + title -> small LLM) | vlm (GPU: the photo -> VLM)
    llm: LLMConfig = field(default_factory=_default_llm)   # the tags path's writer (any digr.evidence.llm backend)
    vlm: LLMConfig = field(default_factory=_default_vlm)   # the vlm path (backend vllm, a Qwen2.5-VL-class model)
    prompt: str = "caption_v1"      # tags path: a file in digr/evidence/prompts/ (name without .txt) or a path
    vlm_prompt: str = "caption_vlm_v1"
    max_tags: int = 3               # tags shown to the writer, most probable first
    min_tag_prob: float = 0.02      # below this a tag is noise; the top tag is always kept
    max_title_chars: int = 200
    max_sentences: int = 2
    vlm_image_side: int = 768       # the VLM gets the photo re-encoded as JPEG, longer side at most this
    fetch_timeout_s: float = 10.0   # vlm path: the photo is fetched again (digr.evidence.images rules) for the request
    fetch_retries: int = 2
    max_items: int = 0              # 0 = every item; else the first N by item_idx (smoke runs)
    enabled: bool = False           # run inside the whole pipeline (needs the images stage; ~20 s an item on 2 cores)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"caption.mode: {self.mode!r} is not one of {MODES}")
        if self.mode == "vlm" and self.vlm.backend != "vllm":
            raise ValueError(f"caption.vlm.backend: the vlm path runs on vllm, got {self.vlm.backend!r}")
        if self.max_tags < 1 or self.max_sentences < 1 or self.vlm_image_side < 32:
            raise ValueError("caption.max_tags and caption.max_sentences must be >= 1, caption.vlm_image_side >= 32")

    def source_name(self, image_encoder: str = "") -> str:
        if self.mode == "vlm":
            return self.vlm.display_name()
        return f"{self.llm.display_name()}+{image_encoder or 'image'}-tags"


# ---------------------------------------------------------------- pure core

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _one_line(text: Any, max_chars: int) -> str:
    """Item text as one line: control characters and line breaks become spaces, so data cannot
    start a line of its own inside the prompt."""
    return " ".join(_CONTROL.sub(" ", str(text or "")).split())[:max_chars]


def pick_tags(tags: list[dict[str, Any]] | None, max_tags: int, min_prob: float) -> list[str]:
    """[{label, prob}] best first -> up to max_tags labels with prob >= min_prob (the top one always)."""
    tags = tags or []
    return [str(t["label"]) for i, t in enumerate(tags[:max_tags]) if i == 0 or float(t["prob"]) >= min_prob]


def render_item(title: Any, labels: list[str], max_title_chars: int = 200) -> str:
    """-> "Product: <title>\\nThe photo shows: <labels>" (the tags path's {item})."""
    line = f"Product: {_one_line(title, max_title_chars) or '(no title)'}"
    return line + (f"\nThe photo shows: {_one_line(', '.join(labels), 300)}" if labels else "")


def fill(template: PromptTemplate, item: str) -> list[dict[str, Any]]:
    """Template + rendered item -> chat messages. A plain split on the one "{item}" (never
    str.format), so braces in item text cannot reach the template."""
    head, tail = template.user.split("{item}")
    messages: list[dict[str, Any]] = [{"role": "system", "content": template.system},
                                      {"role": "user", "content": head + item + tail}]
    return messages + ([{"role": "assistant", "content": template.prefill}] if template.prefill else [])


def image_data_url(uri: str, fetch: ImagesConfig, max_side: int) -> tuple[str, str]:
    """An image_url -> ("data:image/jpeg;base64,...", "") or ("", reason). Re-encoded as JPEG
    with the longer side <= max_side: a VLM sees ~1 MP at most, and rows stay small in Ray's store."""
    got = fetch_image_bytes(uri, fetch)
    if got.data is None:
        return "", f"{got.status}: {got.error}"
    img, err = decode_image(got.data, fetch.max_pixels)
    if img is None:
        return "", f"decode_error: {err}"
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


def vlm_messages(template: PromptTemplate, title: Any, image_url: str, max_title_chars: int = 200
                 ) -> list[dict[str, Any]]:
    """-> OpenAI-style chat with the photo as an image_url part before the text of the user turn."""
    messages = fill(template, f"Product: {_one_line(title, max_title_chars) or '(no title)'}")
    messages[1]["content"] = [{"type": "image_url", "image_url": {"url": image_url}},
                              {"type": "text", "text": messages[1]["content"]}]
    return messages


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def clean_caption(text: str, max_sentences: int = 2, prefill: str = "") -> tuple[str | None, str]:
    """Raw reply -> (caption, "") or (None, reason). Keeps the first paragraph's first
    `max_sentences` complete sentences; a reply cut off before any sentence ends, or that is
    no more than the prefill, is a failure, not a caption."""
    text = (text or "").strip().strip('"').strip()
    text = re.sub(r"^(caption|answer)\s*:\s*", "", text, flags=re.I)
    para = " ".join(text.split("\n\n")[0].split())
    if not para or para.rstrip(" .") == prefill.strip().rstrip(" ."):
        return None, "empty reply"
    sentences = [s for s in _SENTENCE_END.split(para) if s]
    complete = [s for s in sentences if s[-1] in ".!?"]
    if not complete:
        return None, f"no complete sentence in reply: {para[:120]!r}"
    return " ".join(complete[:max_sentences]), ""


class VLMRequests:
    """Ray Data UDF (tasks): rows (item_idx, title, image_url) -> + messages_json with the photo
    as a data URL; rows whose photo cannot be fetched now get `fetch_error` and no messages."""

    def __init__(self, template: PromptTemplate, fetch: ImagesConfig, max_side: int, max_title_chars: int) -> None:
        self.template, self.fetch, self.max_side, self.max_title_chars = template, fetch, max_side, max_title_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        msgs, errs = [], []
        for title, url in zip(batch.column("title").to_pylist(), batch.column("image_url").to_pylist()):
            data_url, err = image_data_url(url, self.fetch, self.max_side)
            msgs.append(json.dumps(vlm_messages(self.template, title, data_url, self.max_title_chars))
                        if data_url else "")
            errs.append(err)
        return batch.select(["item_idx"]).append_column("messages_json", pa.array(msgs, pa.string())) \
            .append_column("fetch_error", pa.array(errs, pa.string()))


def vlm_processor(cfg: LLMConfig, passthrough: tuple[str, ...]) -> Any:
    """Ray's vLLM processor for a VLM: digr.evidence.llm's engine config + the multimodal stage, which
    turns image_url parts into the engine's image inputs. Builds without vLLM installed."""
    from ray.data.llm import build_processor

    pc = vllm_processor_config(cfg).model_copy(update={"prepare_multimodal_stage": {"enabled": True}})
    return build_processor(pc, preprocess=VLLMPreprocess(cfg.max_new_tokens, cfg.temperature, None),
                           postprocess=VLLMPostprocess(passthrough))


# ---------------------------------------------------------------- Ray wrapper


def _collect(ds: Any) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.select(["item_idx", "generated_text", "error"]).to_pylist():
            out[int(r["item_idx"])] = (r["generated_text"] or "", r["error"] or "")
    return out


def run_caption(items: pa.Table, images: pa.Table, cfg: CaptionConfig, out_dir: str, image_encoder: str = "",
                backend: Any = None, log: Callable[[str], None] = print) -> pa.Table:
    """Caption every item row (item_idx, item_id, title, image_url) whose images.parquet row is ok.
    `backend` replaces the tags path's `build_backend(cfg.llm)` (tests). Writes
    `out_dir/captions.parquet` and returns it, ordered by item_idx."""
    import ray

    items = items.sort_by("item_idx")
    if cfg.max_items:
        items = items.slice(0, cfg.max_items)
    image_rows = {int(r["item_idx"]): r for r in images.select(["item_idx", "status", "error", "tags"]).to_pylist()}
    template = load_prompt(cfg.vlm_prompt if cfg.mode == "vlm" else cfg.prompt)
    rows = items.to_pylist()
    todo = [r for r in rows if image_rows.get(int(r["item_idx"]), {}).get("status") == "ok"]
    log(f"[caption] {len(todo)} of {len(rows)} items have an image to caption ({cfg.mode} path)")
    replies: dict[int, tuple[str, str]] = {}
    if todo and cfg.mode == "tags":
        msgs = [json.dumps(fill(template, render_item(
            r.get("title"), pick_tags(image_rows[int(r["item_idx"])]["tags"], cfg.max_tags, cfg.min_tag_prob),
            cfg.max_title_chars))) for r in todo]
        table = pa.table({"item_idx": pa.array([int(r["item_idx"]) for r in todo], pa.int32()), "messages_json": msgs})
        backend = backend or build_backend(cfg.llm)
        backend.prepare()
        bs = cfg.llm.batch_size
        blocks = [table.slice(i, bs) for i in range(0, table.num_rows, bs)]  # one block per batch: all actors busy
        replies = _collect(backend.map(ray.data.from_arrow(blocks)))
    elif todo:
        fetch = ImagesConfig(timeout_s=cfg.fetch_timeout_s, max_retries=cfg.fetch_retries)
        table = pa.table({"item_idx": pa.array([int(r["item_idx"]) for r in todo], pa.int32()),
                          "title": [str(r.get("title") or "") for r in todo],
                          "image_url": [str(r.get("image_url") or "") for r in todo]})
        bs = cfg.vlm.batch_size
        reqs = ray.data.from_arrow([table.slice(i, bs) for i in range(0, table.num_rows, bs)]).map_batches(
            VLMRequests, fn_constructor_kwargs={"template": template, "fetch": fetch, "max_side": cfg.vlm_image_side,
                                                "max_title_chars": cfg.max_title_chars},
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
        # A photo that fetched during the images stage but not now (a transient outage) is
        # dropped here and reported below as failed; its reason stays on the VLM actor's row only.
        reqs = reqs.filter(lambda r: not r["fetch_error"]).select_columns(["item_idx", "messages_json"])
        post = VLLMPostprocess(("item_idx", "messages_json"))
        replies = _collect(vlm_processor(cfg.vlm, ("item_idx", "messages_json"))(reqs).map(post.normalise))
    source = cfg.source_name(image_encoder)
    out = []
    for r in rows:
        idx = int(r["item_idx"])
        img = image_rows.get(idx)
        cap, status, err = None, "ok", ""
        if img is None or img["status"] == "missing":
            status, err = "no_image", "no image_url" if img else "item not in images.parquet"
        elif img["status"] != "ok":
            status, err = "image_failed", f"{img['status']}: {img['error']}"
        elif idx not in replies:
            status, err = "failed", "no reply (image could not be fetched again for the request)"
        else:
            text, backend_err = replies[idx]
            cap, err = (None, backend_err) if backend_err else clean_caption(text, cfg.max_sentences, template.prefill)
            status = "ok" if cap else "failed"
        out.append({"item_idx": idx, "item_id": str(r["item_id"]), "caption": cap, "status": status,
                    "error": err, "source": source, "prompt_version": template.version})
    result = pa.Table.from_pylist(out, schema=CAPTIONS_SCHEMA)
    storage.write_table(storage.join(out_dir, "captions.parquet"), result)
    statuses = result.column("status").to_pylist()
    log("[caption] " + ", ".join(f"{s}={statuses.count(s)}" for s in STATUSES))
    return result


def caption_stage(cfg: CaptionConfig, ingest_dir: str, images_dir: str, out: str) -> dict[str, Any]:
    """Stage body for digr.pipeline.stages: ingest/items.parquet + images/images.parquet -> <out>/captions.parquet."""
    items = storage.read_table(storage.join(ingest_dir, "items.parquet"))
    images = storage.read_table(storage.join(images_dir, "images.parquet"))
    encoder = (images.schema.metadata or {}).get(ENCODER_KEY, b"").decode()
    result = run_caption(items, images, cfg, out, image_encoder=encoder)
    statuses = result.column("status").to_pylist()
    return {"rows": {"items": result.num_rows, **{s: statuses.count(s) for s in STATUSES}},
            "stats": {"source": cfg.source_name(encoder), "prompt_version": result.column("prompt_version")[0].as_py()
                      if result.num_rows else ""}}
