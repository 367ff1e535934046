"""Images stage (digr.evidence.images): fetching over a loopback HTTP server on 127.0.0.1 (404, timeout,
retry after 503, size cap), local paths and s3:// routing, decoding, preprocessing, the real
EfficientNet-Lite0 on real photos (scikit-image's), a tiny random CLIP, and the Ray Data actor
pool on a small catalogue with broken, slow, corrupt and missing images."""

from __future__ import annotations

import io
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest
import skimage  # real photos come from scikit-image's data folder (the test extra installs it)

from digr.evidence import images
from digr.platform import storage
from digr.platform.config import ConfigError, from_dict

PHOTOS = os.path.join(os.path.dirname(skimage.__file__), "data")
COFFEE, CAT, ROCKET = (os.path.join(PHOTOS, f) for f in ("coffee.png", "chelsea.png", "rocket.jpg"))
CUPS = {"espresso", "cup", "coffee mug", "espresso maker", "coffeepot"}
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _Images(BaseHTTPRequestHandler):
    """/coffee.png, /rocket.jpg: real photos; /missing.png: 404; /slow.png: no answer until the
    server stops (a timeout); /corrupt.jpg: HTML served as image/jpeg; /truncated.png: half a PNG;
    /flaky.png: 503 on the first request, the photo after."""

    calls: dict[str, int] = {}
    stop = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        n = _Images.calls[self.path] = _Images.calls.get(self.path, 0) + 1
        if self.path == "/slow.png":
            _Images.stop.wait(10)  # bounded: released at teardown
            return self._send(200, _read(COFFEE))
        if self.path == "/flaky.png" and n == 1:
            return self._send(503, b"busy")
        body = {"/coffee.png": lambda: _read(COFFEE), "/flaky.png": lambda: _read(COFFEE),
                "/rocket.jpg": lambda: _read(ROCKET), "/corrupt.jpg": lambda: b"<html>not an image</html>",
                "/truncated.png": lambda: _read(COFFEE)[:4000]}.get(self.path)
        self._send(200, body()) if body else self._send(404, b"not found")

    def _send(self, code: int, data: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "image/jpeg" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture(scope="module")
def server():
    _Images.calls = {}
    _Images.stop.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Images.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


FAST = images.ImagesConfig(timeout_s=0.5, total_timeout_s=5.0, max_retries=1, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def lite0() -> images.EfficientNetLite0:
    import torch

    torch.set_num_threads(1)
    return images.EfficientNetLite0(device="cpu")


# ---------------------------------------------------------------- config, fetching, decoding


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="images.encoder"):
        images.ImagesConfig(encoder="resnet")
    with pytest.raises(ValueError, match="images.model"):
        images.ImagesConfig(encoder="clip")
    with pytest.raises(ConfigError, match="timeout_s"):
        from_dict(images.ImagesConfig, {"timeout_s": "soon"})
    assert images.ImagesConfig(encoder="clip", model="/m/clip-vit-b32/").source_name() == "clip:clip-vit-b32"


def test_fetch_over_loopback_http(server) -> None:
    sleeps: list[float] = []
    got = images.fetch_image_bytes(f"{server}/coffee.png", FAST)
    assert got.status == "ok" and got.data == _read(COFFEE)

    got = images.fetch_image_bytes(f"{server}/missing.png", FAST, sleep=sleeps.append)
    assert (got.status, got.data, got.error) == ("fetch_error", None, "http 404: Not Found")
    assert _Images.calls["/missing.png"] == 1 and sleeps == []  # a 404 is final: no retry

    got = images.fetch_image_bytes(f"{server}/flaky.png", FAST, sleep=sleeps.append)
    assert got.status == "ok" and _Images.calls["/flaky.png"] == 2 and len(sleeps) == 1  # 503 -> backoff -> ok
    assert 0.005 <= sleeps[0] <= 0.01  # attempt 0: uniform(cap/2, cap), cap = backoff_s

    got = images.fetch_image_bytes(f"{server}/slow.png", FAST, sleep=sleeps.append)
    assert got.status == "fetch_error" and "timed out" in got.error and "(after 2 attempts)" in got.error
    assert _Images.calls["/slow.png"] == 2

    small = images.ImagesConfig(max_bytes=1000)
    got = images.fetch_image_bytes(f"{server}/coffee.png", small)
    assert got.status == "fetch_error" and got.error.startswith("too large: Content-Length")

    got = images.fetch_image_bytes("http://127.0.0.1:1/x.png", FAST, sleep=sleeps.append)  # nothing listens on port 1
    assert got.status == "fetch_error" and "ConnectionRefusedError" in got.error


def test_fetch_local_missing_unsupported_and_s3(monkeypatch, tmp_path) -> None:
    assert images.fetch_image_bytes(CAT, FAST).data == _read(CAT)
    assert images.fetch_image_bytes(f"file://{CAT}", FAST).data == _read(CAT)
    assert images.fetch_image_bytes("", FAST) == images.Fetched(None, "missing", "no image_url")
    assert images.fetch_image_bytes(None, FAST).status == "missing"
    got = images.fetch_image_bytes(str(tmp_path / "nope.jpg"), FAST)
    assert got.status == "fetch_error" and "FileNotFoundError" in got.error
    assert images.fetch_image_bytes("ftp://host/x.jpg", FAST).error == "unsupported scheme ftp://"
    # s3:// goes through digr.platform.storage (no S3 here: the storage call is observed, not a bucket)
    seen: list[str] = []
    monkeypatch.setattr(storage, "read_bytes", lambda uri: seen.append(uri) or b"bytes")
    assert images.fetch_image_bytes("s3://bucket/items/1.jpg", FAST).data == b"bytes"
    assert seen == ["s3://bucket/items/1.jpg"]


def test_decode_errors_modes_and_orientation() -> None:
    from PIL import Image

    img, err = images.decode_image(b"<html>not an image</html>")
    assert img is None and err.startswith("UnidentifiedImageError")
    img, err = images.decode_image(_read(COFFEE)[:4000])
    assert img is None and err  # truncated PNG
    img, err = images.decode_image(_read(COFFEE), max_pixels=1000)
    assert img is None and err == "600x400 pixels > images.max_pixels 1000"

    def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent cut-out background -> white
    img, _ = images.decode_image(encode(clear, "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    img, _ = images.decode_image(encode(Image.new("L", (5, 3), 77), "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    img, _ = images.decode_image(encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif))
    assert img.size == (20, 40)


def test_preprocess_resize_crop_normalise_by_hand() -> None:
    from PIL import Image

    # 512x256, left half black, right half white: shorter side is already 256, so the centre
    # 224 crop spans columns 144..367; the black/white edge at 256 puts 112 columns on each side.
    im = Image.new("RGB", (512, 256), (0, 0, 0))
    im.paste((255, 255, 255), (256, 0, 512, 256))
    x = images.preprocess(im, 224, 256, (127.0,) * 3, (128.0,) * 3)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.allclose(x[:, :, :100], -127 / 128) and np.allclose(x[:, :, 124:], 1.0)
    small = images.preprocess(Image.new("RGB", (30, 10), (127, 127, 127)), 224, 256, (127.0,) * 3, (128.0,) * 3)
    assert small.shape == (3, 224, 224) and np.allclose(small, 0.0)  # upscaled, then cropped


def test_top_k_tags_and_labels() -> None:
    labels = images.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[504] == "coffee mug" and labels[967] == "espresso"
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    tags = images.top_k_tags(probs, ["a", "b", "c"], 2)
    assert [[t["label"] for t in row] for row in tags] == [["b", "c"], ["a", "c"]]
    assert tags[0][0]["prob"] == pytest.approx(0.6)


# ---------------------------------------------------------------- encoders


def test_efficientnet_lite0_tags_real_photos_and_vector_is_the_classifier_input(lite0) -> None:
    import torch

    imgs = [images.decode_image(_read(p))[0] for p in (COFFEE, CAT, ROCKET)]
    x = np.stack([lite0.pixels(im) for im in imgs])
    vectors, probs = lite0.encode(x)
    assert vectors.shape == (3, 1280) and probs.shape == (3, 1000) and vectors.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    tags = images.top_k_tags(probs, lite0.labels, 5)
    coffee, cat, rocket = ([t["label"] for t in row] for row in tags)
    assert coffee[0] == "espresso" and tags[0][0]["prob"] > 0.5 and CUPS & set(coffee[1:])
    assert CATS & set(cat[:3])
    assert {"missile", "projectile", "space shuttle"} & set(rocket[:3])
    # the pooled vector is exactly what the classifier reads: the package's own forward agrees
    with torch.inference_mode():
        full = lite0.model(torch.as_tensor(x)).softmax(-1).numpy()
    assert np.allclose(full, probs, atol=1e-5)
    assert (vectors >= 0).all() and (vectors <= 6).all()  # ReLU6 activations, average-pooled


def test_clip_encoder_on_a_tiny_random_clip(tmp_path) -> None:
    """The GPU path's code on a tiny random CLIPModel + word-level tokenizer built here (no hub)."""
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "photo", "of", "cup.", "cat."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": len(words), "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                  "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=8)
    CLIPModel(cfg).eval().save_pretrained(tmp_path)
    enc = images.build_encoder(images.ImagesConfig(encoder="clip", model=str(tmp_path)), device="cpu")
    assert isinstance(enc, images.ClipEncoder) and enc.dim == 8 and enc.size == 32
    px = np.stack([enc.pixels(Image.new("RGB", (50, 40), c)) for c in ((255, 0, 0), (0, 0, 255))])
    assert px.shape == (2, 3, 32, 32)
    vectors, probs = enc.encode(px)
    assert vectors.shape == (2, 8) and probs.shape == (2, 1000) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert not np.allclose(vectors[0], vectors[1])


# ---------------------------------------------------------------- Ray Data actor pool


def test_images_stage_on_a_catalogue_over_loopback(ray_local, server, tmp_path) -> None:
    rows = [("coffee", f"{server}/coffee.png"), ("cat-local", CAT), ("rocket", f"{server}/rocket.jpg"),
            ("broken", f"{server}/missing.png"), ("slow", f"{server}/slow.png"), ("corrupt", f"{server}/corrupt.jpg"),
            ("no-image", ""), ("truncated", f"{server}/truncated.png")]
    items = pa.table({"item_idx": pa.array(range(len(rows)), pa.int32()), "item_id": [r[0] for r in rows],
                      "title": [r[0] for r in rows], "image_url": [r[1] for r in rows]})
    ingest = tmp_path / "ingest"
    storage.write_table(str(ingest / "items.parquet"), items)
    cfg = images.ImagesConfig(timeout_s=0.5, max_retries=1, backoff_s=0.01, batch_size=3, concurrency=2)
    res = images.images_stage(cfg, str(ingest), str(tmp_path / "images"))
    assert res["rows"] == {"items": 8, "ok": 3, "missing": 1, "fetch_error": 2, "decode_error": 2}
    assert res["stats"] == {"encoder": "efficientnet-lite0", "dim": 1280}

    table = storage.read_table(str(tmp_path / "images" / "images.parquet"))
    assert table.schema.equals(images.IMAGES_SCHEMA)
    assert table.schema.metadata[images.ENCODER_KEY] == b"efficientnet-lite0"
    by_id = {r["item_id"]: r for r in table.to_pylist()}
    assert [r["item_idx"] for r in table.to_pylist()] == list(range(8))
    assert {k: by_id[k]["status"] for k in by_id} == {
        "coffee": "ok", "cat-local": "ok", "rocket": "ok", "broken": "fetch_error", "slow": "fetch_error",
        "corrupt": "decode_error", "no-image": "missing", "truncated": "decode_error"}
    assert by_id["broken"]["error"] == "http 404: Not Found" and "timed out" in by_id["slow"]["error"]
    assert by_id["corrupt"]["error"].startswith("UnidentifiedImageError")
    for k, r in by_id.items():
        ok = r["status"] == "ok"
        assert (r["vector"] is not None) == ok and (r["tags"] is not None) == ok, k  # no stand-in vectors
        assert (r["error"] == "") == ok, k
    assert len(by_id["coffee"]["vector"]) == 1280 and len(by_id["coffee"]["tags"]) == 5
    assert by_id["coffee"]["tags"][0]["label"] == "espresso"
    assert CATS & {t["label"] for t in by_id["cat-local"]["tags"][:3]}

    vectors, has = images.load_image_vectors(str(tmp_path / "images" / "images.parquet"), 8)
    assert vectors.shape == (8, 1280) and has.tolist() == [True, True, True] + [False] * 5
    assert np.isnan(vectors[~has]).all() and not np.isnan(vectors[has]).any()
    assert np.allclose(vectors[0], by_id["coffee"]["vector"]) and not math.isnan(float(vectors[1, 0]))

    # ... and on into the tokenizer (IEID "+ image"): the real image vectors are fused with
    # the text before quantisation; the five items without a usable image still get SIDs.
    from digr.evidence.embed import EmbedConfig
    from digr.pipeline.stages import embed_stage, tokenize_stage
    from digr.platform.scaling import ScalingConfig
    from digr.tokenizer.rqvae import RQVAEConfig
    from digr.tokenizer.tokenize import TokenizeConfig

    info = embed_stage(EmbedConfig(fields=("title",), evidence=("image",), batch_size=4), str(ingest),
                       str(tmp_path / "embed"), images_dir=str(tmp_path / "images"))
    assert info["stats"]["image_dim"] == 1280 and info["stats"]["items_with_image"] == 3
    tok = TokenizeConfig(rqvae=RQVAEConfig(levels=2, codebook_size=4, hidden_dims=(32,), latent_dim=8, epochs=5,
                                           batch_size=8, kmeans_iters=3, dead_code_window=0),
                         scaling=ScalingConfig(num_workers=1), report_every=0)
    out = tokenize_stage(tok, str(tmp_path / "embed"), str(tmp_path / "tokenize"), image_dim=1280)
    assert out["rows"] == {"items": 8} and out["stats"]["unique_sids"] == 8
    assert storage.read_json(str(tmp_path / "tokenize" / "tokenizer.json"))["image_dim"] == 1280
