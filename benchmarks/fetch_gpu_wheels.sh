#!/usr/bin/env bash
# Fetch into .whl/ (repo root, ignored through .git/info/exclude) the wheels that benchmarks/gpu_validate.sh
# installs on a CUDA machine without internet whose image has Python 3.12, torch and an older Hugging Face
# stack. Run it where pip reaches a package index. The versions are the ones the project is tested with:
# - transformers and what its 5.25 release needs (huggingface_hub 2, httpx2, kernels): the package does
#   not train on transformers 5.17 (sliced logits and Mllama's cross-attention mask fail there);
# - timm, accelerate, peft, trl, bitsandbytes, datasets, evaluate and the pure-python needs of datasets
#   (dill, multiprocess); pyarrow, xxhash, fsspec and pandas come with the image.
# bitsandbytes ships one CUDA library per CUDA release (43 MB in all); only the CPU one and those named in
# BNB_CUDA (default: 130 132, for a torch built with CUDA 13) are kept, so that the set stays small.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
    kernels==0.19.1 tomlkit==0.15.3
    timm==1.0.31 accelerate==1.16.0 peft==0.21.2 trl==1.16.0 bitsandbytes==0.50.2
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p .whl
rm -f .whl/*.whl # one version of each: two of a package stop the install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"

BNB_CUDA="${BNB_CUDA:-130 132}" python3 - <<'EOF'
import glob, os, zipfile

keep = {"cpu", *(f"cuda{v}" for v in os.environ["BNB_CUDA"].split())}

def wanted(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith("libbitsandbytes_") or base[len("libbitsandbytes_") :].split(".")[0] in keep

(path,) = glob.glob(".whl/bitsandbytes-*.whl")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w") as dst:
    for info in src.infolist():
        if wanted(info.filename):
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # the kept files' hashes are unchanged
                data = "".join(l for l in data.decode().splitlines(True) if wanted(l.split(",")[0])).encode()
            dst.writestr(info, data)
os.replace(path + ".tmp", path)
EOF

ls -s --block-size=K .whl/*.whl
du -ch --apparent-size .whl/*.whl | tail -1
