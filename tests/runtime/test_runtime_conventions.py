"""Issue 24: sentence-transformers' encode options mean what they mean there, or are refused.

Prompts (diffcse.json `prompts`, `prompt`/`prompt_name`, `encode_query`/`encode_document`),
`truncate_dim` and `precision` are compared with sentence-transformers itself on the same
tiny model; every option that cannot apply raises one sentence instead of being ignored.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from diffcse_runtime import Encoder, load_metadata, write_metadata
from diffcse_runtime.conventions import ConventionError, quantize_embeddings, truncate_dims
from tests.support import tiny

TEXTS = tiny.corpus(12, seed=5) + ["a", ""]
PROMPTS = {"query": "query: ", "document": "passage: ", "title": "title of the page: "}
PRECISIONS = ["float32", "int8", "uint8", "binary", "ubinary"]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return Encoder(tiny_model_dir)


def with_prompts(folder, dst, prompts=PROMPTS, default=None):
    """A copy of `folder` whose diffcse.json carries prompts (as diffcse-export writes)."""
    shutil.copytree(folder, dst)
    meta = load_metadata(dst)
    meta.prompts, meta.default_prompt_name = dict(prompts), default
    write_metadata(dst, meta)
    return dst


@pytest.fixture(scope="module")
def prompted(tiny_model_dir, tmp_path_factory):
    return Encoder(with_prompts(tiny_model_dir, tmp_path_factory.mktemp("p") / "m"))


# ---------------------------------------------------------------- prompts


def test_a_prompt_changes_the_vector_as_prefixed_text(encoder):
    plain = encoder.encode(TEXTS)
    prompted = encoder.encode(TEXTS, prompt="query: ")
    assert np.abs(plain - prompted).max() > 1e-3
    np.testing.assert_array_equal(prompted, encoder.encode(["query: " + t for t in TEXTS]))


def test_named_prompts_from_the_model_folder(prompted):
    by_text = {name: prompted.encode([p + t for t in TEXTS]) for name, p in PROMPTS.items()}
    np.testing.assert_array_equal(prompted.encode(TEXTS, prompt_name="title"), by_text["title"])
    np.testing.assert_array_equal(prompted.encode_query(TEXTS), by_text["query"])
    np.testing.assert_array_equal(prompted.encode_document(TEXTS), by_text["document"])
    np.testing.assert_array_equal(
        prompted.encode_query(TEXTS, prompt_name="title"), by_text["title"]
    )
    assert prompted.prompts == PROMPTS and prompted.default_prompt_name is None


def test_query_and_document_default_to_no_prompt(encoder, tiny_model_dir, tmp_path):
    """As in sentence-transformers 5+, a model always has "query" and "document" prompts,
    empty unless it names them: so a "passage"-only model's documents get no prompt."""
    assert encoder.prompts == {"query": "", "document": ""}
    np.testing.assert_array_equal(encoder.encode_query(TEXTS), encoder.encode(TEXTS))
    passage = Encoder(with_prompts(tiny_model_dir, tmp_path / "m", {"passage": "passage: "}))
    np.testing.assert_array_equal(passage.encode_document(TEXTS), encoder.encode(TEXTS))
    np.testing.assert_array_equal(
        passage.encode(TEXTS, prompt_name="passage"),
        encoder.encode(["passage: " + t for t in TEXTS]),
    )


def test_mteb_prompt_type_picks_the_same_prompt(prompted):
    query = prompted.encode(TEXTS, task_metadata=None, hf_split="test", prompt_type="query")
    np.testing.assert_array_equal(query, prompted.encode_query(TEXTS))


def test_default_prompt_name_and_an_empty_prompt(tiny_model_dir, tmp_path):
    enc = Encoder(with_prompts(tiny_model_dir, tmp_path / "m", default="query"))
    np.testing.assert_array_equal(enc.encode(TEXTS), enc.encode(TEXTS, prompt_name="query"))
    np.testing.assert_allclose(np.stack(list(enc.embed(TEXTS))), enc.encode(TEXTS), atol=1e-6)
    ids, _ = enc.tokenize(TEXTS)  # the server's path: same prompt, same rows
    np.testing.assert_allclose(enc.encode_token_ids(ids[:3]), enc.encode(TEXTS[:3]), atol=1e-6)
    assert enc.tokenize(TEXTS, prompt="")[0] == Encoder(tiny_model_dir).tokenize(TEXTS)[0]
    np.testing.assert_array_equal(
        enc.encode(TEXTS, prompt=""), Encoder(tiny_model_dir).encode(TEXTS)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_name": "doc"}, "prompt_name 'doc' is not one of this model's prompts"),
        ({"prompt_name": "query", "prompt": "q: "}, "pass prompt or prompt_name, not both"),
        ({"prompt": 3}, "prompt must be a string"),
    ],
)
def test_prompt_mistakes_are_refused(prompted, kwargs, message):
    with pytest.raises(ConventionError, match=message):
        prompted.encode(TEXTS, **kwargs)


# ---------------------------------------------------------------- truncate_dim


def test_truncate_dim_keeps_the_first_dimensions(encoder):
    full = encoder.encode(TEXTS)
    np.testing.assert_array_equal(encoder.encode(TEXTS, truncate_dim=8), full[:, :8])
    unit = encoder.encode(TEXTS, truncate_dim=8, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(unit, truncate_dims(full, 8, normalize=True), atol=1e-7)
    assert encoder.encode("one text", truncate_dim=5).shape == (5,)
    assert encoder.encode(TEXTS, truncate_dim=32).shape == (len(TEXTS), 32)


def test_truncate_dim_on_the_encoder(tiny_model_dir, encoder):
    enc = Encoder(tiny_model_dir, truncate_dim=6)
    assert enc.get_sentence_embedding_dimension() == 6 and enc.embedding_dim == 32
    np.testing.assert_array_equal(enc.encode(TEXTS), encoder.encode(TEXTS)[:, :6])
    np.testing.assert_array_equal(enc.encode(TEXTS, truncate_dim=4), encoder.encode(TEXTS)[:, :4])
    np.testing.assert_allclose(
        np.stack(list(enc.embed(TEXTS, normalize=True))),
        encoder.encode(TEXTS, truncate_dim=6, normalize=True),
        atol=1e-6,
    )
    clone = pickle.loads(pickle.dumps(enc))  # workers keep the setting
    assert clone.truncate_dim == 6 and clone.encode("a").shape == (6,)


def test_truncate_dims_renormalises_a_normalised_models_rows():
    rows = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float32) / 13
    np.testing.assert_allclose(truncate_dims(rows, 2, normalize=True), [[0.6, 0.8], [0, 0]])
    np.testing.assert_allclose(truncate_dims(rows, 2, normalize=False), rows[:, :2])
    for dim in (0, 4, 2.5, True):
        with pytest.raises(ConventionError, match="truncate_dim must be"):
            truncate_dims(rows, dim, normalize=True)


@pytest.mark.parametrize("dim", [0, 33, -1, 1.5])
def test_a_bad_truncate_dim_is_refused(tiny_model_dir, encoder, dim):
    with pytest.raises(ConventionError, match="truncate_dim must be"):
        encoder.encode(TEXTS, truncate_dim=dim)
    with pytest.raises(ConventionError, match="truncate_dim must be"):
        Encoder(tiny_model_dir, truncate_dim=dim)


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_matches_sentence_transformers(encoder, precision):
    theirs = pytest.importorskip("sentence_transformers.util.quantization").quantize_embeddings

    floats = encoder.encode(TEXTS, normalize=True)
    ours = encoder.encode(TEXTS, normalize=True, precision=precision)
    expected = theirs(floats, precision=precision)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    calibration = encoder.encode(tiny.corpus(40, seed=9), normalize=True)
    ours = encoder.encode(
        TEXTS, normalize=True, precision=precision, calibration_embeddings=calibration
    )
    expected = theirs(floats, precision=precision, calibration_embeddings=calibration)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(quantize_embeddings(floats, precision), theirs(floats, precision))


def test_calibrated_codes_do_not_depend_on_batch_neighbours(prompted):
    calibration = prompted.encode(tiny.corpus(40, seed=9))
    options = dict(prompt_name="query", truncate_dim=calibration.shape[1])
    batch = prompted.encode(TEXTS, precision="int8", calibration_embeddings=calibration, **options)
    for i in (0, 5, len(TEXTS) - 1):
        alone = prompted.encode(
            TEXTS[i], precision="int8", calibration_embeddings=calibration, **options
        )
        np.testing.assert_array_equal(alone, batch[i])
    cut = prompted.encode(TEXTS, truncate_dim=8, normalize=True)
    for i in (0, 5):
        one = prompted.encode(TEXTS[i], truncate_dim=8, normalize=True)
        np.testing.assert_allclose(one, cut[i], atol=1e-6)


def test_precision_needs_ranges_for_one_text(encoder):
    with pytest.raises(ConventionError, match="one text gives none: pass calibration_embeddings"):
        encoder.encode("just one", precision="int8")
    ranges = np.stack([-np.ones(32), np.ones(32)])
    assert encoder.encode("just one", precision="uint8", ranges=ranges).dtype == np.uint8
    assert encoder.encode([], precision="int8").shape == (0, 32)
    with pytest.raises(ConventionError, match=r"ranges must have shape \(2, 8\)"):
        encoder.encode(TEXTS, precision="int8", ranges=ranges, truncate_dim=8)
    with pytest.raises(ConventionError, match=r"calibration_embeddings must be a \(n, 32\)"):
        encoder.encode(TEXTS, precision="int8", calibration_embeddings=np.ones((4, 7)))
    with pytest.raises(ConventionError, match="precision must be one of"):
        encoder.encode(TEXTS, precision="int4")


# ---------------------------------------------------------------- refused options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"convert_to_tensor": True}, "convert_to_tensor=True is not supported: .*torch-free"),
        ({"convert_to_numpy": False}, "convert_to_numpy=False is not supported"),
        ({"output_value": "token_embeddings"}, "output_value='token_embeddings' is not"),
        ({"output_value": None}, "output_value=None is not supported"),
        ({"device": "cuda"}, "device='cuda' is not supported: .*providers"),
        ({"pool": object()}, "pool=.* is not supported"),
        ({"chunk_size": 10}, "chunk_size=10 is not supported"),
        ({"normalise": True}, "unknown option 'normalise'"),
        ({"max_length": 16}, "unknown option 'max_length'"),
    ],
)
def test_options_that_cannot_apply_are_refused(encoder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode(TEXTS, **kwargs)
    with pytest.raises(ValueError, match=message):
        encoder.encode_query(TEXTS, **kwargs)


def test_the_neutral_values_still_work(encoder):
    plain = encoder.encode(TEXTS)
    same = encoder.encode(
        TEXTS,
        convert_to_numpy=True,
        convert_to_tensor=False,
        output_value="sentence_embedding",
        device=None,
        pool=None,
        chunk_size=None,
        show_progress_bar=False,
        task_name="STSBenchmark",
    )
    np.testing.assert_array_equal(plain, same)


# ---------------------------------------------------------------- against sentence-transformers


@pytest.fixture(scope="module")
def st_pair(tiny_bert, tmp_path_factory):
    """tiny_bert as a mean-pooled, normalised sentence-transformers folder, and its export."""
    pytest.importorskip("sentence_transformers")
    from tests.support.tiny import export_model_dir

    root = tmp_path_factory.mktemp("st_pair")
    source = tiny.as_sentence_transformers(tiny_bert, root / "st", "mean", True, max_seq_length=64)
    out = export_model_dir(source, root / "onnx", max_seq_length=64)
    return source, with_prompts(out, root / "prompted")


def test_prompts_and_truncation_match_sentence_transformers(st_pair, one_torch_thread):
    from sentence_transformers import SentenceTransformer

    source, folder = st_pair
    theirs = SentenceTransformer(str(source), device="cpu", prompts=PROMPTS, truncate_dim=8)
    ours = Encoder(folder, truncate_dim=8)
    assert ours.prompts == theirs.prompts
    for name in ("query", "title"):
        expected = theirs.encode(TEXTS, prompt_name=name, normalize_embeddings=True)
        got = ours.encode(TEXTS, prompt_name=name, normalize=True)
        np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(
        ours.encode_document(TEXTS, normalize=True),
        theirs.encode_document(TEXTS, normalize_embeddings=True),
        atol=2e-5,
    )
    expected = theirs.encode_query(TEXTS, normalize_embeddings=True, precision="ubinary")
    np.testing.assert_array_equal(ours.encode_query(TEXTS, precision="ubinary"), expected)


def test_mteb_reads_the_truncated_width(tiny_model_dir):
    pytest.importorskip("mteb")
    assert Encoder(tiny_model_dir, truncate_dim=6).mteb_model_meta.embed_dim == 6
