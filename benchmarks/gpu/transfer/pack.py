"""Pack what a GPU quality session needs into one folder that travels with the checkout.

Only for a machine reached through a size-limited transfer: one with PyTorch and transformers
but no registry and no hub, where a call carries at most 64 MiB. On any other CUDA machine
run benchmarks/gpu/quality.sh directly. all-MiniLM-L6-v2's fp32 weights are 87 MiB, so they
travel as float16 (43 MiB) and `unpack` widens them back to float32 there. Rounding to fp16
moves each weight by at most 2^-11 of its value; every contender starts from the same
rounded model, and each run scores that model itself (its step 0), so comparisons are
unaffected.

    python -m benchmarks.gpu.transfer.pack pack .gpu               # here: model, corpus, STS data
    python -m benchmarks.gpu.transfer.pack unpack .gpu /tmp/minilm  # there (transfer/unpack.sh)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks.benchlib import STS_DATA

WEIGHTS = "model.safetensors"
HALF = "model.fp16.safetensors"


def pack(dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from diffcse_runtime import builtin

    src = builtin.model_path("builtin:all-MiniLM-L6-v2")
    model = dest / "minilm"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*onnx*"))
    tensors = load_file(str(src / WEIGHTS))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(model / HALF))
    sentences = builtin.corpus_sentences("builtin:wiki_en")
    (dest / "wiki_en.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    sts = dest / "sts"
    if sts.exists():
        shutil.rmtree(sts)
    shutil.copytree(STS_DATA, sts)
    print(f"packed {src} (fp16), {len(sentences)} sentences and STS dev data into {dest}")


def unpack(src: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src / "minilm", out, ignore=shutil.ignore_patterns(HALF))
    tensors = load_file(str(src / "minilm" / HALF))
    full = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(full, str(out / WEIGHTS), metadata={"format": "pt"})
    print(f"unpacked {out} (float32 from float16)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pack"] and len(sys.argv) == 3:
        pack(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["unpack"] and len(sys.argv) == 4:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
