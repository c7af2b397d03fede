"""Retrieval for a LangChain app on diffcse-serve: OpenAIEmbeddings and a tiny in-memory store.

    diffcse-serve --model my-model --port 8080 &
    python examples/langchain_rag.py http://127.0.0.1:8080/v1 "What do plants need?"

`check_embedding_ctx_length=False` is the one setting LangChain needs: by default it sends
tiktoken token arrays, and diffcse-serve (which has its own tokenizer) answers those with a
400 that says to set it. No LLM is called: the retrieved passages are what you would put in
a prompt.
"""

from __future__ import annotations

import os
import sys

from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings

DOCS = [
    "Plants need light, water and carbon dioxide to make sugar by photosynthesis.",
    "Guitars usually have six strings tuned E A D G B E.",
    "The Pacific is the largest and deepest ocean on Earth.",
    "Bread rises because yeast produces carbon dioxide gas.",
]


def main(base_url: str, question: str) -> None:
    embeddings = OpenAIEmbeddings(
        model=os.environ.get("DIFFCSE_MODEL", "my-model"),
        base_url=base_url,
        api_key=os.environ.get("DIFFCSE_API_KEY", "unused"),
        check_embedding_ctx_length=False,  # send strings, not tiktoken token arrays
    )
    store = InMemoryVectorStore(embeddings)
    store.add_documents([Document(page_content=text) for text in DOCS])
    retriever = store.as_retriever(search_kwargs={"k": 2})
    for doc in retriever.invoke(question):
        print("-", doc.page_content)


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1",
        sys.argv[2] if len(sys.argv) > 2 else "What do plants need to grow?",
    )
