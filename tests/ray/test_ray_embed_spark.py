"""The README's Spark recipe (mapInPandas on the picklable Encoder) on a local PySpark session.

Skipped, with the reason, where pyspark or a Java runtime is missing. The recipe below is
the README's "Spark" code, unchanged but for the names.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from diffcse_runtime import Encoder

pyspark = pytest.importorskip("pyspark", reason="pyspark not installed (pip install pyspark)")
if shutil.which("java") is None:
    pytest.skip("no Java runtime on PATH: PySpark needs one", allow_module_level=True)

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql.types import ArrayType, FloatType, StructField, StructType  # noqa: E402

pytestmark = pytest.mark.slow  # a local PySpark session (a JVM)


def embed_column(df, encoder: Encoder, text_col: str = "text", batch_size: int = 64):
    """README recipe: `encoder` is pickled by path and settings with the function, and each
    Spark task rebuilds its onnxruntime session once, then embeds its Arrow batches."""

    def embed_partitions(batches):
        for pdf in batches:
            vectors = encoder.encode(pdf[text_col].tolist(), batch_size=batch_size)
            yield pdf.assign(embedding=list(vectors))

    schema = StructType([*df.schema.fields, StructField("embedding", ArrayType(FloatType()))])
    return df.mapInPandas(embed_partitions, schema)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    # Python workers must run the interpreter that has diffcse installed, as on a cluster
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .appName("diffcse-test")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.local.dir", str(tmp_path_factory.mktemp("spark")))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_map_in_pandas_recipe_equals_encoder(spark, tiny_model_dir):
    from tests.support import tiny

    texts = tiny.corpus(120, seed=3)
    encoder = Encoder(tiny_model_dir, intra_op_threads=1)
    df = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id long, text string")
    rows = embed_column(df.repartition(3), encoder).collect()
    rows.sort(key=lambda r: r["id"])
    assert [r["text"] for r in rows] == texts
    got = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got, encoder.encode(texts), atol=1e-5)
