"""``TransformersPolicy``: a local Hugging Face VLM (Qwen2.5-VL first) as the agent's policy.

What it guarantees, beyond "generate a reply":

* **Token-in, token-out.** Every reply comes with the exact prompt ids, output ids and per-token
  log-probabilities. For every turn after the first, the prompt ids are the previous turn's
  prompt ids, then its output ids, then only the new observation: earlier turns are never
  re-tokenised, even when the chat template would render them differently.
* **Multi-turn KV reuse.** Turn k+1 continues from turn k's key/value cache, so earlier text and
  images are not encoded again; greedy results equal a full re-prefill.
* **Batching.** Concurrent calls (``run_batch``, group rollouts) are served together: each
  prompt is prefilled on its own cache, then decoding runs as one left-padded batch with
  per-sequence stop handling.

Generation runs on one worker thread that owns the model, so the event loop is never blocked
and calls from any event loop (or thread) are safe.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    DynamicCache,
)

from genagent._qwen_processors import image_only_processor
from genagent._torch import pick_device, pick_dtype
from genagent.errors import ConfigurationError, PolicyError
from genagent.messages import Message, TextPart
from genagent.policies._base import PolicyOutput, SamplingParams
from genagent.trajectory import Usage

__all__ = ["LogitsProcessor", "PolicyStats", "TransformersPolicy"]

logger = logging.getLogger("genagent.policies.transformers")

LogitsProcessor = Callable[[Sequence[int], Sequence[int], torch.Tensor], torch.Tensor]
"""``fn(prompt_ids, output_ids, logits) -> logits`` applied to one sequence's next-token logits
(a 1-D float tensor) before suppression and sampling: constrained decoding, biases, tests."""

_QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_SENTINEL = "\u2063GENAGENT-PREVIOUS-REPLY\u2063"


@dataclass
class PolicyStats:
    """Counters of a :class:`TransformersPolicy` (for benchmarks and monitoring).

    Attributes:
        batches: Batches served.
        sequences: Replies generated.
        prompt_tokens: Prompt tokens of all calls.
        prefill_tokens: Prompt tokens actually encoded (the rest came from cached turns).
        decode_steps: Forward passes while decoding (one per batch step).
        session_misses: Calls continuing a conversation whose previous turn was not cached
            (evicted, or a history changed by a hook): encoded from scratch, so their prompt
            ids may not extend the previous turn's.
    """

    batches: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    session_misses: int = 0  # continued conversations that had to be encoded from scratch


@dataclass
class _Session:
    """What a conversation's last turn left behind, for the next turn to continue from."""

    ids: list[int]  # prompt + output ids of the last turn
    cache: Any  # DynamicCache over ids[:cache_len] (None: no reuse)
    cache_len: int
    next_pos: int  # rope position after ids
    n_images: int
    end_text: str  # text of a trailing special token the model generated (EOS), if any
    reply: str = ""  # the reply text as returned


@dataclass
class _Request:
    messages: list[Message]
    stop: tuple[str, ...]
    sampling: SamplingParams
    future: concurrent.futures.Future[PolicyOutput]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the caller stopped waiting: stop decoding it


def _row_order(seq: _Sequence) -> tuple[int, int, list[int]]:
    """Sort key of a batch's rows: by prompt length, seed, then prompt ids."""
    seed = seq.request.sampling.seed
    return (len(seq.prompt_ids), -1 if seed is None else seed, seq.prompt_ids)


@dataclass(frozen=True)
class _Sampling:
    """The sampling a request gets, the model's generation_config filling what it leaves unset."""

    temperature: float  # 0: greedy
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None


@dataclass
class _Sequence:
    """One request inside a batch: what to prefill, then its decoding state."""

    request: _Request
    prompt_ids: list[int]
    chunk: list[int]  # the prompt ids not in ``cache``
    positions: torch.Tensor  # position ids of ``chunk``: (3, 1, n) for Qwen-VL, else (1, n)
    pixel_values: torch.Tensor | None  # of the images in ``chunk``
    grid: torch.Tensor | None
    cache: Any  # this sequence's cache before the batch (None: empty), after it its own again
    cached_tokens: int
    n_images: int
    generator: torch.Generator | None
    first_out_pos: int = 0  # rope position of the first output token
    sampling: _Sampling = _Sampling(0.0, None, None, None)
    logits: torch.Tensor | None = None  # next-token logits after the prefill
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop: str | None = None


class TransformersPolicy:
    """A local transformers VLM as the policy (token-in/token-out, KV reuse, batching).

    Use :meth:`from_pretrained` for checkpoints; the constructor takes a loaded model and
    processor (or a tokenizer, for text-only models).

    Args:
        model: A transformers model with a causal LM head (e.g. Qwen2.5-VL).
        processor: Its processor (chat template, tokenizer, image processor), or a tokenizer.
        name: Recorded as the policy's name (default: the checkpoint's name).
        reuse_kv: Continue each turn from the previous turn's key/value cache.
        max_batch_size: Most requests served in one batch.
        batch_wait_s: How long the worker waits for more requests after the first.
        max_sessions: Conversations whose cache is kept for their next turn (least recently
            used are dropped, and simply prefill again). Each holds its whole context's keys
            and values on the model's device: for a 7B Qwen2.5-VL, about 57 KB per token in
            bf16 (0.3 GB for a 5,000-token conversation).
        logits_processors: Functions applied to each sequence's logits before sampling.
        suppress_token_ids: Extra token ids never to generate (vision placeholders always are).
        model_id: The checkpoint id or path, for metadata.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str | None = None,
        reuse_kv: bool = True,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        max_sessions: int = 16,
        logits_processors: Sequence[LogitsProcessor] = (),
        suppress_token_ids: Sequence[int] = (),
        model_id: str | None = None,
    ) -> None:
        if max_batch_size < 1 or max_sessions < 0 or batch_wait_s < 0:
            raise ConfigurationError(
                "max_batch_size must be >= 1, max_sessions >= 0 and batch_wait_s >= 0"
            )
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
        self.name = name or (Path(str(self.model_id)).name if self.model_id else "transformers")
        self.reuse_kv = reuse_kv
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_sessions = max_sessions
        self.logits_processors = list(logits_processors)
        # sessions by the messages their reply answered (several replies: runs, branches)
        self._sessions: OrderedDict[str, list[_Session]] = OrderedDict()
        self.stats = PolicyStats()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._loader: Callable[[], tuple[Any, Any]] | None = None
        self._ready = model is not None
        self._extra_suppress = list(suppress_token_ids)
        if self._ready:
            self._configure()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        attn_implementation: str | dict[str, str] | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        trust_remote_code: bool = False,
        processor: Any = None,
        lazy: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **policy_kwargs: Any,
    ) -> TransformersPolicy:
        """Load a checkpoint through transformers' own loading path.

        The model is ``AutoModelForImageTextToText`` (``AutoModelForCausalLM`` for text-only
        models) and the processor ``AutoProcessor``; for Qwen-VL checkpoints where the video
        processor cannot be built (no torchvision), an image-only processor is used instead.

        Args:
            model_id_or_path: A Hugging Face model id or a local folder.
            device: ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"`` (default: the best available).
            dtype: ``"auto"`` (bf16 on GPUs that support it, fp16 on other GPUs and MPS, fp32 on
                CPU), a torch dtype, or its name.
            attn_implementation: Passed to transformers (``"sdpa"``, ``"eager"``, a registered
                kernel, or a dict per sub-config). ``"genagent_varlen"`` (or its alias
                ``"fused"``) selects genagent's fused Triton attention (``[kernels]`` extra):
                it is registered with transformers and enabled on the language model and the
                vision tower (:func:`genagent.kernels.hf.enable_fused_attention`); calls the
                kernels cannot serve fall back to PyTorch attention, with a log line.
            revision: Branch, tag or commit of the checkpoint.
            subfolder: Folder of the model inside the repository (the processor is looked for
                there too, then at the root).
            trust_remote_code: Allow the checkpoint's own modelling code.
            processor: A processor to use instead of loading one.
            lazy: Load on the first call (so constructing an agent is instant).
            model_kwargs: Extra keyword arguments for the model's ``from_pretrained``.
            **policy_kwargs: Arguments of the constructor (``reuse_kv``, ``max_batch_size``, ...).

        Raises:
            ConfigurationError: If the checkpoint cannot be loaded (with what to try).
        """
        resolved_device = pick_device(device)
        resolved_dtype = pick_dtype(dtype, resolved_device)
        attn_implementation, fused = _resolve_attention(attn_implementation)

        def load() -> tuple[Any, Any]:
            common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
            kwargs: dict[str, Any] = {**common, "dtype": resolved_dtype, **(model_kwargs or {})}
            if subfolder:
                kwargs["subfolder"] = subfolder
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            auto_vl: Any = AutoModelForImageTextToText
            auto_lm: Any = AutoModelForCausalLM
            model: Any
            try:
                try:
                    model = auto_vl.from_pretrained(model_id_or_path, **kwargs)
                except ValueError as exc:
                    if "Unrecognized configuration class" not in str(exc):
                        raise
                    model = auto_lm.from_pretrained(model_id_or_path, **kwargs)
                loaded_processor = processor or _load_processor(
                    model_id_or_path, subfolder, common, model.config
                )
            except ConfigurationError:
                raise
            except Exception as exc:  # OSError, ValueError, SafetensorError, ... from loaders
                raise ConfigurationError(
                    f"cannot load {model_id_or_path!r}: {type(exc).__name__}: {exc}. Check the "
                    "id or path (a corrupt or partial download: delete it and download again); "
                    "for gated weights run `huggingface-cli login`; offline, point at a local "
                    "folder."
                ) from exc
            if fused:  # the vision tower's single call per layer (and sub-models not yet set)
                from genagent.kernels.hf import enable_fused_attention

                enable_fused_attention(model, attn_implementation)
            try:
                model.to(resolved_device)
            except Exception as exc:
                raise ConfigurationError(
                    f"cannot move {model_id_or_path!r} to {resolved_device}: "
                    f"{type(exc).__name__}: {exc}. Pick another device=..., or a smaller "
                    "dtype=... (e.g. 'bfloat16')."
                ) from exc
            model.eval()
            return model, loaded_processor

        if lazy:
            policy = cls(None, None, model_id=model_id_or_path, **policy_kwargs)
            policy._loader = load
            return policy
        model, loaded = load()
        return cls(model, loaded, model_id=model_id_or_path, **policy_kwargs)

    def _ensure_loaded(self) -> None:
        if self._ready:
            return
        assert self._loader is not None
        self.model, self.processor = self._loader()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._configure()
        self._ready = True

    def _configure(self) -> None:
        config = self.model.config
        self.device = next(self.model.parameters()).device
        self.image_token_id: int | None = getattr(config, "image_token_id", None)
        self.is_vision = self.image_token_id is not None and hasattr(
            self.processor, "image_processor"
        )
        vision_ids = [
            getattr(config, attr, None)
            for attr in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
            )
        ]
        vocab = self.tokenizer.get_vocab()
        vision_ids += [vocab.get(t) for t in ("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")]
        self.suppress_ids = sorted(
            {i for i in [*vision_ids, *self._extra_suppress] if i is not None}
        )
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        eos_list = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_list.append(self.tokenizer.eos_token_id)
        self.eos_ids = {int(e) for e in eos_list if e is not None}
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else next(iter(self.eos_ids), 0)
        )
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        self.generation_defaults = generation

    # ------------------------------------------------------------------ Policy

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
    ) -> PolicyOutput:
        """Generate the next reply (served in a batch with concurrent calls)."""
        import asyncio

        request = _Request(
            messages=list(messages),
            stop=tuple(s for s in stop if s),
            sampling=sampling or SamplingParams(),
            future=concurrent.futures.Future(),
        )
        self._start_worker()
        self._queue.put(request)
        try:
            return await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            request.cancelled = True  # the worker stops decoding it at the next step
            raise

    def describe(self) -> dict[str, Any]:
        """Metadata for trajectories."""
        return {
            "name": self.name,
            "class": "genagent.policies.TransformersPolicy",
            "model": self.model_id,
            "reuse_kv": self.reuse_kv,
            "max_batch_size": self.max_batch_size,
        }

    def close(self) -> None:
        """Stop the worker thread and drop cached conversations."""
        worker = self._worker
        if worker is not None:
            self._queue.put(None)
            worker.join(timeout=10)
            self._worker = None
        self._sessions.clear()

    # ------------------------------------------------------------------ worker

    def _start_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._serve, name=f"genagent-policy-{self.name}", daemon=True
                )
                self._worker.start()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        item = self._queue.get(timeout=remaining)
                    else:
                        item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)

    def _run_batch(self, requests: list[_Request]) -> None:
        try:
            self._ensure_loaded()
        except Exception as exc:
            for request in requests:
                request.future.set_exception(_as_policy_error(exc, "loading the model"))
            return
        sequences: list[_Sequence] = []
        with torch.inference_mode():
            for request in requests:
                try:
                    sequences.append(self._prepare(request))
                except Exception as exc:
                    request.future.set_exception(_as_policy_error(exc, "preparing the prompt"))
            if not sequences:
                return
            # rows in an order that does not depend on arrival: a row's floating-point result
            # can depend on its place in the batch, and arrival order depends on timing
            sequences.sort(key=_row_order)
            self.stats.batches += 1
            self.stats.sequences += len(sequences)
            try:
                self._generate(sequences)
            except Exception as exc:
                for seq in sequences:
                    if not seq.request.future.done():
                        seq.request.future.set_exception(_as_policy_error(exc, "generating"))
                return
        for seq in sequences:
            seq.request.future.set_result(self._finish(seq))

    # ------------------------------------------------------------------ prefill

    def _prepare(self, request: _Request) -> _Sequence:
        """Tokenise the request (continuing its conversation's ids when it can); no forward."""
        conversation, refs = self._to_hf(request.messages)
        session, delta_text = self._continuation(request.messages, conversation)
        if session is not None and delta_text is not None:
            new_images = _decode_images(refs[session.n_images :])
            enc = self._encode(delta_text, new_images)
            prompt_ids = session.ids + enc["input_ids"][0].tolist()
            if session.cache is not None:
                chunk = prompt_ids[session.cache_len :]
                start = session.next_pos - (len(session.ids) - session.cache_len)
                cache, cached = session.cache, session.cache_len
            else:  # the same ids, encoded again from scratch
                chunk, start, cache, cached = prompt_ids, 0, None, 0
                enc = self._encode_ids_images(prompt_ids, _decode_images(refs))
        else:
            if any(m.role == "assistant" for m in request.messages):
                self.stats.session_misses += 1
            text = self._render(conversation, add_generation_prompt=True)
            enc = self._encode(text, _decode_images(refs))
            prompt_ids = enc["input_ids"][0].tolist()
            chunk, start, cache, cached = prompt_ids, 0, None, 0
        if self.max_positions is not None and len(prompt_ids) >= self.max_positions:
            raise PolicyError(
                f"the prompt is {len(prompt_ids)} tokens, at or over the model's limit of "
                f"{self.max_positions}; lower max_rounds or the image resolution"
            )
        grid: Any = enc.get("image_grid_thw")
        positions = self._positions(torch.tensor([chunk], device=self.device), grid, start)
        pixels = enc.get("pixel_values")
        generator = None
        if request.sampling.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(request.sampling.seed)
        return _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            chunk=chunk,
            positions=positions,
            pixel_values=pixels.to(self.device, self.model.dtype) if pixels is not None else None,
            grid=grid.to(self.device) if grid is not None else None,
            cache=cache,
            cached_tokens=cached,
            n_images=len(refs),
            generator=generator,
            first_out_pos=int(positions.max()) + 1,
            sampling=self._effective_sampling(request.sampling),
        )

    def _continuation(
        self, messages: list[Message], conversation: list[dict[str, Any]]
    ) -> tuple[_Session | None, str | None]:
        """The session this call continues, and the text that follows its ids.

        Sessions are found by the messages the previous reply answered, and the reply in the
        conversation must start with what was generated: text the agent appended (a closing tag
        the model left open) is encoded as part of the new chunk. The previous reply is rendered
        as a placeholder, so what follows it is found even when the template rewrites replies
        (e.g. strips reasoning from past turns): the previous turn's ids are kept exactly as
        generated either way. A session is kept after use (its cache is copied, never
        modified), so several continuations of one turn (identical runs, branches) all reuse it.
        """
        last_reply = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
        if last_reply < 0 or self.max_sessions == 0:
            return None, None
        reply = messages[last_reply].text
        key = _key(messages[:last_reply])
        candidates = [s for s in self._sessions.get(key, []) if reply.startswith(s.reply)]
        if not candidates:
            return None, None
        session = max(candidates, key=lambda s: len(s.reply))
        self._sessions.move_to_end(key)
        placeholder = [
            *conversation[:last_reply],
            {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]},
        ]
        before = self._render(placeholder, add_generation_prompt=False)
        after = self._render(
            [*placeholder, *conversation[last_reply + 1 :]], add_generation_prompt=True
        )
        at = before.find(_SENTINEL)
        if at < 0 or not after.startswith(before):
            logger.warning(
                "the chat template does not extend the previous turn; prefilling again (this "
                "turn's prompt ids will not start with the previous turn's ids)"
            )
            return None, None
        closing = before[at + len(_SENTINEL) :]
        appended = reply[len(session.reply) :]  # e.g. a closing tag the agent added
        if not appended and session.end_text and closing.startswith(session.end_text):
            closing = closing[len(session.end_text) :]
        if not self.reuse_kv:
            session = _Session(**{**vars(session), "cache": None})
        return session, appended + closing + after[len(before) :]

    def _encode(self, text: str, images: Sequence[Any]) -> dict[str, Any]:
        if images:
            if not self.is_vision:
                raise PolicyError(
                    f"{self.name} has no image processor, but the conversation has images; "
                    "use a vision-language checkpoint"
                )
            return dict(
                self.processor(
                    text=[text], images=list(images), return_tensors="pt", add_special_tokens=False
                )
            )
        if self.is_vision:
            return dict(self.processor(text=[text], return_tensors="pt", add_special_tokens=False))
        return dict(self.tokenizer([text], return_tensors="pt", add_special_tokens=False))

    def _encode_ids_images(self, ids: list[int], images: Sequence[Any]) -> dict[str, Any]:
        """Pixel values for a full prefill of already-tokenised ids (no reuse)."""
        if not images:
            return {}
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        return dict(pixels)

    def _positions(self, ids: torch.Tensor, grid: Any, start: int) -> torch.Tensor:
        """Position ids of ``ids`` (continuing at ``start``): 3-D rope for Qwen-VL."""
        if (
            self.image_token_id is not None
            and hasattr(self.model, "model")
            and hasattr(self.model.model, "get_rope_index")
        ):
            types = (ids == self.image_token_id).int()
            positions, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=types, image_grid_thw=grid
            )
            shifted: torch.Tensor = positions + start
            return shifted
        length = ids.shape[1]
        return torch.arange(start, start + length, device=self.device).unsqueeze(0)

    def _to_hf(self, messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[Any]]:
        """The conversation in the chat-template format, and its image references in order."""
        conversation: list[dict[str, Any]] = []
        refs: list[Any] = []
        for message in messages:
            content: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                else:
                    content.append({"type": "image"})
                    refs.append(part.image)
            conversation.append({"role": message.role, "content": content})
        return conversation, refs

    def _render(self, conversation: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        renderer = self.processor if self.is_vision else self.tokenizer
        if not self.is_vision:  # text-only tokenizers take plain string contents
            conversation = [
                {"role": m["role"], "content": "".join(c.get("text", "") for c in m["content"])}
                for m in conversation
            ]
        text: str = renderer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return text

    # ------------------------------------------------------------------ decode

    def _generate(self, sequences: list[_Sequence]) -> None:
        """Prefill in groups of similar length, then decode every sequence as one batch."""
        for group in _prefill_groups(sequences):
            self._prefill(group)
        self._decode(sequences)

    def _prefill(self, group: list[_Sequence]) -> None:
        """One forward over the group's new prompt tokens, on their cached turns.

        Each row is its cached tokens (left-padded to the group's longest cache), then its new
        prompt tokens (left-padded to the longest chunk). ``real`` marks a row's own positions;
        the padding is masked out of attention and dropped from the cache each row gets back.
        """
        batch = len(group)
        cached = [s.cache.get_seq_length() if s.cache is not None else 0 for s in group]
        cache = _merge_caches([s.cache for s in group], cached, max(cached))
        width = max(len(s.chunk) for s in group)
        real = torch.zeros(batch, max(cached) + width, dtype=torch.bool, device=self.device)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long, device=self.device)
        rows = []
        for i, seq in enumerate(group):
            n = len(seq.chunk)
            real[i, max(cached) - cached[i] : max(cached)] = True
            real[i, max(cached) + width - n :] = True
            ids[i, width - n :] = torch.tensor(seq.chunk, device=self.device)
            rows.append(torch.nn.functional.pad(seq.positions, (width - n, 0)))
        positions = torch.cat(rows, dim=-2) if self._rope3d else torch.cat(rows, dim=0)
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": positions,
            "attention_mask": real.long(),
            "cache": cache,
            "use_cache": True,
            "logits_to_keep": 1,  # only the next token's logits, not the whole prompt's
        }
        pixels = [s.pixel_values for s in group if s.pixel_values is not None]
        if pixels:  # image features fill the image tokens in batch order
            inputs["pixel_values"] = torch.cat(pixels)
            inputs["image_grid_thw"] = torch.cat([s.grid for s in group if s.grid is not None])
        logits = self.model(**inputs).logits[:, -1].float()
        for i, seq in enumerate(group):
            seq.logits = logits[i]
            seq.cache = _row_cache(cache, i, real[i], len(seq.prompt_ids))
            self.stats.prompt_tokens += len(seq.prompt_ids)
            self.stats.prefill_tokens += len(seq.chunk)

    def _decode(self, sequences: list[_Sequence]) -> None:
        """Sample until every sequence stops, as one left-padded batch.

        What a finished row is fed while the others go on is masked out (``real``) and dropped
        from the cache each sequence gets back.
        """
        batch = len(sequences)
        lengths = [len(s.prompt_ids) for s in sequences]
        cache = _merge_caches([s.cache for s in sequences], lengths, max(lengths))
        real = torch.zeros(batch, max(lengths), dtype=torch.bool, device=self.device)
        for i, length in enumerate(lengths):
            real[i, max(lengths) - length :] = True
        logits = torch.stack([s.logits for s in sequences if s.logits is not None])
        budgets = [self._budget(s) for s in sequences]
        # a token holds at least one byte: this many tokens always cover a stop string
        stop_chars = max(
            (len(t.encode("utf-8")) for s in sequences for t in s.request.stop), default=0
        )
        while True:
            tokens, step_positions, fed = [], [], []
            for i, seq in enumerate(sequences):
                if seq.finished:  # feeds padding that nothing will attend to
                    tokens.append(self.pad_id)
                    step_positions.append(seq.first_out_pos)
                    fed.append(False)
                    continue
                if seq.request.cancelled:
                    seq.finished, seq.finish_reason = True, "cancelled"
                    tokens.append(self.pad_id)
                    step_positions.append(seq.first_out_pos)
                    fed.append(False)
                    continue
                token, logprob = self._sample(seq, logits[i])
                seq.output_ids.append(token)
                seq.logprobs.append(logprob)
                self._check_stop(seq, budgets[i], stop_chars)
                tokens.append(token)
                step_positions.append(seq.first_out_pos + len(seq.output_ids) - 1)
                fed.append(True)
            if all(s.finished for s in sequences):
                break
            step = torch.tensor(tokens, device=self.device).unsqueeze(1)
            position_ids = torch.tensor(step_positions, device=self.device).view(batch, 1)
            if self._rope3d:
                position_ids = position_ids.view(1, batch, 1).expand(3, batch, 1)
            real = torch.cat([real, torch.tensor(fed, device=self.device).unsqueeze(1)], 1)
            out = self.model(
                input_ids=step,
                position_ids=position_ids,
                attention_mask=real.long(),
                cache=cache,
                use_cache=True,
            )
            self.stats.decode_steps += 1
            logits = out.logits[:, -1].float()
        # each sequence gets its own cache back: its real tokens, all but the last output token
        # (which the next turn feeds first)
        for i, seq in enumerate(sequences):
            keep = len(seq.prompt_ids) + len(seq.output_ids) - 1
            seq.cache = _row_cache(cache, i, real[i], keep)

    @property
    def _rope3d(self) -> bool:
        return self.image_token_id is not None and hasattr(self.model, "model")

    def _budget(self, seq: _Sequence) -> int:
        budget = seq.request.sampling.max_new_tokens
        if self.max_positions is not None:
            budget = min(budget, self.max_positions - len(seq.prompt_ids))
        return max(1, budget)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> tuple[int, float]:
        sampling = seq.sampling
        for processor in self.logits_processors:
            logits = processor(seq.prompt_ids, seq.output_ids, logits)
        if self.suppress_ids:
            logits = logits.clone()
            logits[self.suppress_ids] = -math.inf
        penalty = sampling.repetition_penalty
        if penalty is not None and penalty != 1.0:
            seen = torch.tensor(
                sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=logits.device
            )
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if sampling.temperature == 0.0:
            token = int(torch.argmax(logits))
            return token, float(torch.log_softmax(logits, -1)[token])
        scaled = logits / sampling.temperature
        logprobs = torch.log_softmax(scaled, -1)
        probs = _truncate(scaled, sampling.top_k, sampling.top_p)
        token = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
        return token, float(logprobs[token])

    def _effective_sampling(self, sampling: SamplingParams) -> _Sampling:
        """The request's settings; with ``temperature=None``, the model's generation_config.

        ``top_k=1`` is greedy, as it is in transformers.
        """
        defaults = self.generation_defaults
        top_k, top_p, penalty = sampling.top_k, sampling.top_p, sampling.repetition_penalty
        if sampling.temperature is not None:
            temperature = sampling.temperature
        elif defaults is not None and getattr(defaults, "do_sample", False):
            temperature = float(getattr(defaults, "temperature", None) or 1.0)
            top_k = top_k if top_k is not None else getattr(defaults, "top_k", None)
            top_p = top_p if top_p is not None else getattr(defaults, "top_p", None)
            if penalty is None:
                penalty = getattr(defaults, "repetition_penalty", None)
        else:
            temperature = 0.0
        if top_k == 1:
            temperature = 0.0
        return _Sampling(temperature, top_k, top_p, penalty)

    def _check_stop(self, seq: _Sequence, budget: int, stop_chars: int) -> None:
        token = seq.output_ids[-1]
        if token in self.eos_ids:
            seq.finished, seq.finish_reason = True, "stop"
            return
        if seq.request.stop:
            tail = self.tokenizer.decode(
                seq.output_ids[-(stop_chars + 2) :], skip_special_tokens=False
            )
            for stop in seq.request.stop:
                if stop in tail:
                    seq.finished, seq.finish_reason, seq.stop = True, "stop", stop
                    return
        if len(seq.output_ids) >= budget:
            seq.finished, seq.finish_reason = True, "length"

    # ------------------------------------------------------------------ results

    def _finish(self, seq: _Sequence) -> PolicyOutput:
        ends_with_eos = bool(seq.output_ids) and seq.output_ids[-1] in self.eos_ids
        text_ids = seq.output_ids[:-1] if ends_with_eos else seq.output_ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        end_text = (
            self.tokenizer.decode(seq.output_ids[-1:], skip_special_tokens=False)
            if ends_with_eos
            else ""
        )
        if self.max_sessions > 0 and not seq.request.cancelled:
            session = _Session(
                ids=seq.prompt_ids + seq.output_ids,
                cache=seq.cache if self.reuse_kv else None,
                cache_len=len(seq.prompt_ids) + len(seq.output_ids) - 1,
                next_pos=seq.first_out_pos + len(seq.output_ids),
                n_images=seq.n_images,
                end_text=end_text,
                reply=text,
            )
            key = _key(seq.request.messages)
            siblings = self._sessions.setdefault(key, [])
            siblings[:] = [s for s in siblings if s.reply != text] + [session]
            self._sessions.move_to_end(key)
            while sum(len(v) for v in self._sessions.values()) > self.max_sessions:
                oldest = next(iter(self._sessions))
                self._sessions[oldest].pop(0)
                if not self._sessions[oldest]:
                    del self._sessions[oldest]
        return PolicyOutput(
            text=text,
            stop=seq.stop,
            finish_reason=seq.finish_reason,
            prompt_ids=seq.prompt_ids,
            output_ids=seq.output_ids,
            logprobs=seq.logprobs,
            usage=Usage(
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                cached_tokens=seq.cached_tokens,
            ),
            latency_s=time.perf_counter() - seq.request.submitted,
            model=self.model_id,
        )


# --------------------------------------------------------------------------- helpers


def _decode_images(refs: Sequence[Any]) -> list[Any]:
    return [ref.open().convert("RGB") for ref in refs]


def _key(messages: Sequence[Message]) -> str:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(message.role.encode())
        for part in message.content:
            if isinstance(part, TextPart):
                digest.update(b"\x00t" + part.text.encode("utf-8", "surrogatepass"))
            else:
                digest.update(b"\x00i" + part.image.sha256.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def _prefill_groups(sequences: list[_Sequence], waste: float = 1.25) -> list[list[_Sequence]]:
    """Split a batch for prefill so that padding stays under ``waste`` x the real tokens.

    A long new prompt and short continuations are prefilled apart: padding every continuation
    to the long prompt would cost more than the extra forward.
    """
    groups: list[list[_Sequence]] = []
    for seq in sorted(sequences, key=lambda s: len(s.chunk), reverse=True):
        group = groups[-1] if groups else None
        if group is not None:
            width = len(group[0].chunk)
            tokens = sum(len(s.chunk) for s in group) + len(seq.chunk)
            if width * (len(group) + 1) <= waste * tokens:
                group.append(seq)
                continue
        groups.append([seq])
    return groups


def _merge_caches(caches: list[Any], lengths: list[int], longest: int) -> Any:
    """One batch cache from per-sequence caches (``None``: empty), left-padded to ``longest``."""
    if longest == 0:
        return DynamicCache()
    template = next(c for c, n in zip(caches, lengths, strict=True) if n)
    layers = []
    for layer_idx, reference in enumerate(template.layers):
        keys, values = [], []
        for cache, length in zip(caches, lengths, strict=True):
            if length:
                k, v = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
            else:
                k = reference.keys.new_zeros(
                    (1, *reference.keys.shape[1:2], 0, reference.keys.shape[-1])
                )
                v = reference.values.new_zeros(
                    (1, *reference.values.shape[1:2], 0, reference.values.shape[-1])
                )
            pad = longest - length
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        layers.append((torch.cat(keys, 0), torch.cat(values, 0)))
    return DynamicCache(ddp_cache_data=layers)


def _row_cache(cache: Any, row: int, real: torch.Tensor, keep: int) -> Any:
    """Row ``row`` of a batch cache: its first ``keep`` real positions, as a cache of its own."""
    index = torch.nonzero(real, as_tuple=True)[0][:keep]
    layers = [
        (
            layer.keys[row : row + 1].index_select(2, index),
            layer.values[row : row + 1].index_select(2, index),
        )
        for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=layers)


def _truncate(scaled: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Probabilities after top-k and top-p (nucleus) truncation."""
    logits = scaled.clone()
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -math.inf
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, -1) - sorted_probs < top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


def _resolve_attention(
    value: str | dict[str, Any] | None,
) -> tuple[Any, bool]:
    """``"fused"`` / ``"genagent_varlen"`` -> the registered fused kernel (in a dict too).

    Returns:
        The implementation to pass to transformers, and whether the fused kernel is in it.
    """
    if isinstance(value, dict):
        resolved = {key: _resolve_attention(sub) for key, sub in value.items()}
        return {k: r for k, (r, _) in resolved.items()}, any(u for _, u in resolved.values())
    if value in ("fused", "genagent_varlen"):
        from genagent.kernels.hf import register

        return register(), True
    return value, False


def _load_processor(
    model_id_or_path: str, subfolder: str | None, common: dict[str, Any], config: Any
) -> Any:
    """``AutoProcessor``, or an image-only Qwen-VL processor where video support is missing."""
    model_type = getattr(config, "model_type", "")
    locations: list[dict[str, Any]] = [{"subfolder": subfolder}] if subfolder else []
    locations.append({})
    last_error: Exception | None = None
    for where in locations:
        auto: Any = AutoProcessor
        try:
            loaded = auto.from_pretrained(model_id_or_path, **common, **where)
        except (OSError, ValueError, ImportError) as exc:  # e.g. torchvision missing
            last_error = exc
            loaded = None
        if loaded is not None and hasattr(loaded, "image_processor"):
            return loaded
        if model_type in _QWEN_VL_TYPES:
            try:
                cls = image_only_processor(model_type)
                return cls.from_pretrained(model_id_or_path, **common, **where)
            except (OSError, ValueError) as exc:
                last_error = exc
                continue
        if loaded is not None:
            return loaded  # a tokenizer, for text-only models
        try:
            return AutoTokenizer.from_pretrained(model_id_or_path, **common, **where)
        except (OSError, ValueError) as exc:
            last_error = exc
    raise ConfigurationError(f"cannot load a processor for {model_id_or_path!r}: {last_error}")


def _as_policy_error(exc: Exception, during: str) -> Exception:
    if isinstance(exc, (PolicyError, ConfigurationError)):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return PolicyError(
            f"out of memory while {during}: lower max_batch_size, max_sessions or the image "
            "resolution, or load the model in a lower dtype"
        )
    return PolicyError(f"the local model failed while {during}: {type(exc).__name__}: {exc}")
