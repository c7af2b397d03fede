"""Pack what the serving benchmark needs for a machine reached through a size-limited transfer.

Only for such a machine (benchmarks/gpu/serve.sh with PACKED=.serve); anywhere else serve.sh
runs as it is. That machine has Python 3.12, onnxruntime, tokenizers and numpy, but no
registry, no FastAPI/uvicorn/pydantic and no wrk, and a call carries at most 64 MiB. So this
packs: the exported MiniLM with its float32 weights as float16 (the fp32 file is 87 MiB;
speed does not depend on the values, and `unpack` widens them back and re-records the model
directory's hashes), the serve extra's wheels for CPython 3.12, wrk with its LuaJIT library,
and the STS data the benchmark reads its sentences from.

    python -m benchmarks.gpu.transfer.serve_pack pack runs/demo_cpu/model .serve  # here
    python -m benchmarks.gpu.transfer.serve_pack unpack .serve /tmp/minilm-onnx    # there
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.benchlib import STS_DATA

WHEELS = ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "httptools"]
WHEELS += ["annotated-types", "typing-inspection", "annotated-doc", "opentelemetry-api"]
SKELETON, HALF = "model.skeleton.onnx", "weights.fp16.npz"


def pack(model: Path, dest: Path) -> None:
    import onnx
    from onnx import numpy_helper

    if dest.exists():
        shutil.rmtree(dest)
    (dest / "model").mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "model.onnx":
            shutil.copy2(f, dest / "model" / f.name)
    graph = onnx.load(str(model / "model.onnx"))
    half = {}
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.raw_data and len(init.raw_data) > 64:
            half[init.name] = numpy_helper.to_array(init).astype(np.float16)
            init.raw_data = b""
    onnx.save(graph, str(dest / "model" / SKELETON))
    np.savez(dest / "model" / HALF, **half)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    pip += ["--python-version", "3.12", "--platform", "manylinux2014_x86_64"]
    subprocess.run([*pip, "-d", str(dest / "wheels"), *WHEELS], check=True)
    (dest / "bin").mkdir()
    shutil.copy2(shutil.which("wrk"), dest / "bin" / "wrk")
    (dest / "lib").mkdir()
    shutil.copy2("/lib/x86_64-linux-gnu/libluajit-5.1.so.2", dest / "lib")
    shutil.copytree(STS_DATA, dest / "sts")
    print(f"packed {model} (weights as fp16), {len(WHEELS)} wheels, wrk and STS data in {dest}")


def unpack(src: Path, out: Path) -> None:
    import onnx

    from diffcse_runtime.model_dir import load_metadata, write_metadata

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src / "model", out, ignore=shutil.ignore_patterns(SKELETON, HALF))
    graph = onnx.load(str(src / "model" / SKELETON))
    half = np.load(src / "model" / HALF)
    for init in graph.graph.initializer:
        if init.name in half:
            init.raw_data = half[init.name].astype("<f4").tobytes()
    onnx.save(graph, str(out / "model.onnx"))
    write_metadata(out, load_metadata(out, verify_hash=False))
    print(f"unpacked {out} (float32 from float16, hashes re-recorded)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pack"] and len(sys.argv) == 4:
        pack(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["unpack"] and len(sys.argv) == 4:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
