#!/usr/bin/env bash
# The parity tests (tests/parity.rs) on burn's wgpu backend over a software Vulkan device
# (Mesa's lavapipe), f32: the GPU code path of burn (CubeCL kernels compiled to SPIR-V/WGSL)
# without a GPU. Not in CI: building burn with `wgpu` costs ~2 GB and tens of minutes on 2 cores.
#
#   bash mhc-burn/scripts/wgpu-parity.sh            # from the repository root, as root (apt-get)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
export VK_ICD_FILENAMES=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json | head -1)
time MHC_BURN_DEVICE=wgpu-cpu cargo test -p mhc-burn --features wgpu --test parity -- --test-threads 1
