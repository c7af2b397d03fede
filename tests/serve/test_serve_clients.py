"""Client conventions on /v1/embeddings: the `openai` client's `dimensions`, and LangChain's
OpenAIEmbeddings (the real `langchain-openai` package) with and without its documented
setting for OpenAI-compatible servers.

Every server is uvicorn in a thread on 127.0.0.1 serving the tiny exported model.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.conventions import truncate_dims  # noqa: E402
from diffcse_runtime.serve import BatchSettings, ServeSettings  # noqa: E402
from tests.support.serve_helpers import SHORT, assert_same_rows, thread_server  # noqa: E402

KEY = "clients-key-0123"


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def url(offline):
    with thread_server({"tiny": offline}, ServeSettings(api_keys=(KEY,))) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)


# ------------------------------------------------------------------ OpenAI's dimensions


@pytest.mark.parametrize("encoding", ["float", None])  # None: the client's base64 default
def test_openai_dimensions_cut_then_renormalise(url, offline, encoding):
    texts = SHORT[:6]
    kwargs = {"encoding_format": encoding} if encoding else {}
    result = client(url).embeddings.create(input=texts, model="tiny", dimensions=16, **kwargs)
    got = np.array([d.embedding for d in result.data])
    assert got.shape == (6, 16)
    assert_same_rows(got, truncate_dims(offline.encode(texts), 16, normalize=True))
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    whole = client(url).embeddings.create(input=texts, model="tiny", dimensions=32)
    assert_same_rows(
        np.array([d.embedding for d in whole.data]), offline.encode(texts, normalize=True)
    )


def test_dimensions_without_normalising_is_a_plain_cut(offline):
    settings = ServeSettings(batch=BatchSettings(normalize=False))
    with thread_server({"tiny": offline}, settings) as base:
        result = client(base).embeddings.create(input=SHORT[:3], model="tiny", dimensions=8)
    got = np.array([d.embedding for d in result.data])
    assert_same_rows(got, offline.encode(SHORT[:3])[:, :8])


def test_bad_dimensions_name_the_field(url):
    for bad in (0, 33):
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).embeddings.create(input="x", model="tiny", dimensions=bad)
        body = caught.value.body
        assert body["param"] == "dimensions"
        assert "between 1 and the model's embedding width 32" in body["message"]


# ------------------------------------------------------------------ LangChain


@pytest.fixture
def byte_tiktoken(monkeypatch):
    """tiktoken's cl100k_base file is downloaded on first use, which fails offline. A real
    tiktoken Encoding over single bytes, registered under that name, lets LangChain's default
    path run as it does online: it tokenizes with tiktoken and sends the token arrays."""
    tiktoken = pytest.importorskip("tiktoken")
    registry = pytest.importorskip("tiktoken.registry")
    ranks = {bytes([i]): i for i in range(256)}
    encoding = tiktoken.Encoding(
        "cl100k_base", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={}
    )
    monkeypatch.setitem(registry.ENCODINGS, "cl100k_base", encoding)


def langchain(base: str, **kwargs):
    lc = pytest.importorskip("langchain_openai")
    return lc.OpenAIEmbeddings(
        model="tiny", base_url=f"{base}/v1", api_key=KEY, max_retries=0, **kwargs
    )


def test_langchain_default_gets_a_400_saying_what_to_set(url, byte_tiktoken):
    with pytest.raises(openai.BadRequestError) as caught:
        langchain(url).embed_documents(["a dog runs", "the cat sleeps"])
    message = caught.value.body["message"]
    assert message.startswith("input[0] is a token array; this server embeds text only")
    assert "check_embedding_ctx_length=False" in message


def test_langchain_with_its_documented_setting_matches_the_encoder(url, offline):
    embeddings = langchain(url, check_embedding_ctx_length=False)
    texts = SHORT[:5]
    assert_same_rows(
        np.array(embeddings.embed_documents(texts)), offline.encode(texts, normalize=True)
    )
    query = embeddings.embed_query("where does the dog run?")
    assert_same_rows(np.array([query]), offline.encode(["where does the dog run?"], normalize=True))
    short = langchain(url, check_embedding_ctx_length=False, dimensions=16)
    got = np.array(short.embed_documents(texts))
    assert_same_rows(got, truncate_dims(offline.encode(texts), 16, normalize=True))


# ------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def prompted(tiny_model_dir, tmp_path_factory) -> Encoder:
    """The tiny model with sentence-transformers prompts and a default prompt."""
    import shutil

    from diffcse_runtime.model_dir import load_metadata, write_metadata

    folder = tmp_path_factory.mktemp("prompted") / "model"
    shutil.copytree(tiny_model_dir, folder)
    meta = load_metadata(folder)
    meta.prompts = {"query": "query: ", "document": "passage: "}
    meta.default_prompt_name = "document"
    write_metadata(folder, meta)
    return Encoder(folder, intra_op_threads=1)


def test_prompts_on_both_routes_match_the_encoder(prompted):
    """No prompt named: the model's default, as Encoder.encode; a named one on request."""
    tei_client = pytest.importorskip("tei_client")
    texts = SHORT[:3]
    plain = prompted.encode(texts, prompt="", normalize=True)
    document = prompted.encode(texts, normalize=True)  # the default prompt
    query = prompted.encode_query(texts, normalize=True)
    assert not np.allclose(plain, document) and not np.allclose(query, document)
    with thread_server({"p": prompted}, ServeSettings()) as base:
        openai_client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)
        got = openai_client.embeddings.create(input=texts, model="p")
        assert_same_rows(np.array([d.embedding for d in got.data]), document)
        asked = {"prompt_name": "query"}
        got = openai_client.embeddings.create(input=texts, model="p", extra_body=asked)
        assert_same_rows(np.array([d.embedding for d in got.data]), query)
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.embeddings.create(input=texts, model="p", extra_body={"prompt_name": "x"})
        assert caught.value.body["param"] == "prompt_name"
        tei = tei_client.HttpClient(base, timeout=30)
        assert tei.prompt_names() == ["query", "document"]
        assert_same_rows(np.array(tei.embed(texts)), document)
        assert_same_rows(np.array(tei.embed(texts, prompt_name="query")), query)
        tokens = tei.tokenize("a dog", prompt_name="query")[0].tokens
        assert [t.text for t in tokens[1:-1]][:2] == ["query", ":"]


# ------------------------------------------------------------------ LlamaIndex


def test_llamaindex_openai_like_embedding_matches_the_encoder(url, offline):
    """LlamaIndex's OpenAI-like class sends strings: it works with no setting."""
    openai_like = pytest.importorskip("llama_index.embeddings.openai_like")
    embedding = openai_like.OpenAILikeEmbedding(
        model_name="tiny", api_base=f"{url}/v1", api_key=KEY, max_retries=0
    )
    texts = SHORT[:4]
    got = np.array(embedding.get_text_embedding_batch(texts))
    assert_same_rows(got, offline.encode(texts, normalize=True))
    query = embedding.get_query_embedding("a dog runs")
    assert_same_rows(np.array([query]), offline.encode(["a dog runs"], normalize=True))
