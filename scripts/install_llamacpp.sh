#!/usr/bin/env bash
# Install the real llama.cpp the GGUF tests run (tests/test_gguf_llamacpp.py): node-llama-cpp 3.21.1 and its
# prebuilt linux-x64 CPU binary package, exactly as tests/llamacpp/package-lock.json pins them (npm ci).
# --ignore-scripts: node-llama-cpp's postinstall would download or build llama.cpp when it finds no
# prebuilt binary; --omit=optional: the other platforms' and the CUDA/Vulkan binaries are not needed.
# The tests then load the binary with build "never" and NODE_LLAMA_CPP_SKIP_DOWNLOAD=true: nothing is
# fetched at run time. Needs node >= 20 and npm.
set -euo pipefail
cd "$(dirname "$0")/../tests/llamacpp"
npm ci --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error
test -f node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/llama-addon.node
