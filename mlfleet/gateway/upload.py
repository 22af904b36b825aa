"""Model upload the Elasticsearch way, mapped onto mlfleet's upload ops:

    PUT /_ml/trained_models/<id>                    {"inference_config": {TASK: {...}}, ...}
    PUT /_ml/trained_models/<id>/vocabulary         {"vocabulary": [...]}          (text tasks)
    PUT /_ml/trained_models/<id>/definition/<part>  {"definition": base64, "total_definition_length",
                                                     "total_parts"}

The configuration and the parts are held by the gateway that receives them (one upload goes
through one gateway); once every part (and, for a task that tokenizes text, the vocabulary) is
in, in any order, the definition is put to the coordinator with ``put_model`` and the model
exists for every gateway and client. A vocabulary (BERT's WordPiece, as Elasticsearch takes it)
becomes the tokenizer.json mlfleet's text tasks read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mlfleet.common.aclient import AsyncClient
from mlfleet.common.clock import Clock
from mlfleet.common.errors import BadRequest, NotFound
from mlfleet.common.messages import TASKS
from mlfleet.gateway.esapi import EsError, illegal, parse_error
from mlfleet.gateway.server import Gateway, handles

MAX_DEFINITION_BYTES = 4 << 30
MAX_PENDING_BYTES = 8 << 30     # the parts held for all uploads in progress together
UPLOAD_IDLE_EXPIRY_S = 3600.0   # an upload that gets no part (or vocabulary) this long is dropped
OFF_LOOP_BYTES = 1 << 20        # a definition this large is joined off the event loop
TEXT_TASKS = frozenset(TASKS) - {"pass_through"}


def _validation(*messages: str) -> EsError:
    return EsError(400, "action_request_validation_exception",
                   "Validation Failed: " + "".join(f"{i}: {m};" for i, m in enumerate(messages, 1)))


@dataclass
class Pending:
    model_id: str
    task: str
    model_config: dict[str, Any]
    tokenization: dict[str, Any]
    config_body: dict[str, Any]
    total_parts: Optional[int] = None
    total_length: Optional[int] = None
    parts: dict[int, bytes] = field(default_factory=dict)
    tokenizer: Optional[bytes] = None
    storing: bool = False
    touched: float = 0.0  # the clock's monotonic time of its last config, part or vocabulary

    def received(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def ready(self) -> bool:
        return (self.total_parts is not None and len(self.parts) == self.total_parts
                and (self.task not in TEXT_TASKS or self.tokenizer is not None))


class Uploads:
    def __init__(self, client: AsyncClient, clock: Any = None) -> None:
        self.client = client
        self.clock = clock or Clock()
        self.pending: dict[str, Pending] = {}
        self.idle_expiry_s = UPLOAD_IDLE_EXPIRY_S
        self.max_pending_bytes = MAX_PENDING_BYTES

    def expire(self) -> None:
        """Drop the uploads idle past ``idle_expiry_s`` (none being stored): their parts are held
        in this gateway's memory."""
        now = self.clock.monotonic()
        for mid, up in list(self.pending.items()):
            if not up.storing and now - up.touched > self.idle_expiry_s:
                del self.pending[mid]

    def add(self, up: Pending) -> None:
        up.touched = self.clock.monotonic()
        self.pending[up.model_id] = up

    def touch(self, up: Pending) -> None:
        up.touched = self.clock.monotonic()

    def held(self) -> int:
        return sum(up.received() for up in self.pending.values())

    def check_room(self, up: Pending, part: int, length: int, size: int) -> None:
        """A part that would take the parts held for all uploads past ``max_pending_bytes``: 400
        when this definition alone is larger, else 429 (others must finish or go first)."""
        limit = self.max_pending_bytes
        if length > limit:
            raise illegal(f"[total_definition_length] [{length}] is more than this gateway holds for "
                          f"uploads in progress [{limit}] bytes")
        after = self.held() - len(up.parts.get(part, b"")) + size
        if after > limit:
            raise EsError(429, "circuit_breaking_exception",
                          f"part [{part}] of [{up.model_id}] would bring the definitions held for uploads "
                          f"in progress to [{after}] bytes, over this gateway's limit of [{limit}] bytes; "
                          "finish or delete other uploads first, or try again later")

    def current(self) -> dict[str, Pending]:
        """The uploads in progress, those idle past ``idle_expiry_s`` dropped first."""
        self.expire()
        return self.pending

    def discard(self, model_id: str) -> bool:
        return self.current().pop(model_id, None) is not None

    def get(self, model_id: str) -> Pending:
        up = self.current().get(model_id)
        if up is None:
            raise NotFound(f"Could not find trained model [{model_id}]: put its configuration first "
                           f"(PUT /_ml/trained_models/{model_id}) through this gateway")
        return up

    async def finish_if_ready(self, up: Pending) -> None:
        if not up.ready() or up.storing:
            return
        parts = [up.parts[i] for i in range(up.total_parts or 0)]
        if (up.total_length or 0) >= OFF_LOOP_BYTES:
            data = await asyncio.to_thread(b"".join, parts)
        else:
            data = b"".join(parts)
        if len(data) != up.total_length:
            self.pending.pop(up.model_id, None)
            raise illegal(f"the definition's parts add up to [{len(data)}] bytes, not "
                          f"[total_definition_length] [{up.total_length}]; put the model again")
        up.storing = True
        try:
            await self.client.put_model_bytes(up.model_id, data, up.task, up.tokenizer,
                                              up.model_config or None)
        finally:
            up.storing = False
        if self.pending.get(up.model_id) is up:  # never a newer upload of the same id
            del self.pending[up.model_id]


def _task_of(inference_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if len(inference_config) != 1:
        raise parse_error("[inference_config] must hold exactly one task, e.g. {\"text_embedding\": {}}")
    (task, settings), = inference_config.items()
    if task not in TASKS:
        raise illegal(f"[inference_config] task [{task}] is not supported by mlfleet; supported: "
                      f"[{','.join(TASKS)}]")
    if not isinstance(settings, dict):
        raise parse_error(f"[inference_config.{task}] must be an object")
    return task, settings


@handles("ml.put_trained_model")
async def _put_config(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    model_id = path["model_id"]
    if p["model_type"] != "pytorch":
        raise illegal(f"[model_type] [{p['model_type']}] is not supported; only [pytorch] models are")
    task, settings = _task_of(p["inference_config"])
    try:
        await gw.client.get_models(model_id)
        exists = True
    except NotFound:
        exists = False
    if exists or model_id in gw.uploads.current():
        raise BadRequest(f"Trained machine learning model [{model_id}] already exists",
                         type="resource_already_exists_exception")
    tokenization = settings.get("tokenization") or {}
    if not isinstance(tokenization, dict) or len(tokenization) > 1:
        raise parse_error(f"[inference_config.{task}.tokenization] must be an object with one "
                          "tokenizer, e.g. {\"bert\": {...}}")
    tok_settings = next(iter(tokenization.values()), {}) if tokenization else {}
    model_config = {k: v for k, v in settings.items() if k != "tokenization"}
    if isinstance(tok_settings, dict) and tok_settings.get("max_sequence_length"):
        model_config["max_sequence_length"] = tok_settings["max_sequence_length"]
    body = {"model_id": model_id, "model_type": "pytorch", "inference_config": {task: settings},
            "input": p["input"] or {"field_names": ["text_field"]}, "create_time": int(time.time() * 1000),
            "fully_defined": False, "location": {"index": {"name": ".ml-inference-native-000002"}}}
    for k in ("description", "metadata", "tags"):
        if p[k] is not None:
            body[k] = p[k]
    gw.uploads.add(Pending(model_id, task, model_config, tokenization, body))
    return body


@handles("ml.put_trained_model_definition_part")
async def _put_part(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    try:
        part = int(path["part"])
    except ValueError:
        raise illegal(f"Failed to parse int parameter [part] with value [{path['part']}]") from None
    total, length = p["total_parts"], p["total_definition_length"]
    problems = []
    if part < 0:
        problems.append("[part] must be greater or equal to 0")
    if length <= 0:
        problems.append("[total_definition_length] must be greater than 0")
    elif length > MAX_DEFINITION_BYTES:
        problems.append(f"[total_definition_length] must be at most {MAX_DEFINITION_BYTES}")
    if total <= 0:
        problems.append("[total_parts] must be greater than 0")
    elif part >= total:
        problems.append("[part] must be less than total_parts")
    if problems:
        raise _validation(*problems)
    up = gw.uploads.get(path["model_id"])
    for name, have, got in (("total_parts", up.total_parts, total),
                            ("total_definition_length", up.total_length, length)):
        if have is not None and have != got:
            raise illegal(f"[{name}] is [{have}] for this model's upload; this part says [{got}]")
    try:
        data = base64.b64decode(p["definition"], validate=True)
    except (binascii.Error, ValueError):
        raise parse_error("[definition] is not valid base64") from None
    if up.received() - len(up.parts.get(part, b"")) + len(data) > length:
        raise illegal(f"the parts received add up to more than [total_definition_length] [{length}]")
    gw.uploads.check_room(up, part, length, len(data))
    up.total_parts, up.total_length = total, length
    up.parts[part] = data
    gw.uploads.touch(up)
    await gw.uploads.finish_if_ready(up)
    return {"acknowledged": True}


def wordpiece_tokenizer(vocabulary: list[str], settings: dict[str, Any]) -> bytes:
    """A tokenizer.json for BERT's WordPiece from Elasticsearch's vocabulary and its ``bert``
    tokenization settings (do_lower_case, with_special_tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {tok: i for i, tok in enumerate(vocabulary)}
    special = bool(settings.get("with_special_tokens", True))
    needed = ["[UNK]", "[PAD]"] + (["[CLS]", "[SEP]"] if special else [])
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise illegal(f"[vocabulary] lacks the special tokens {missing}")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=bool(settings.get("do_lower_case", False)))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if special:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok.to_str().encode()


@handles("ml.put_trained_model_vocabulary")
async def _put_vocabulary(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    up = gw.uploads.get(path["model_id"])
    if up.task not in TEXT_TASKS:
        raise illegal(f"task [{up.task}] takes no vocabulary")
    if p["merges"] or p["scores"]:
        raise illegal("only WordPiece (bert) vocabularies are supported: [merges] and [scores] are not")
    if not all(isinstance(t, str) for t in p["vocabulary"]) or not p["vocabulary"]:
        raise parse_error("[vocabulary] must be a non-empty array of strings")
    (kind, settings), = (up.tokenization or {"bert": {}}).items()
    if kind not in ("bert", "bert_ja"):
        raise illegal(f"tokenization [{kind}] is not supported; only [bert] (WordPiece) is")
    up.tokenizer = wordpiece_tokenizer(p["vocabulary"], settings if isinstance(settings, dict) else {})
    gw.uploads.touch(up)
    await gw.uploads.finish_if_ready(up)
    return {"acknowledged": True}
