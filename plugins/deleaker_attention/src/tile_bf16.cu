// Explicit instantiation of the head-summed tile kernels for one dtype (head sizes 64 and 128).
#include "tile_impl.cuh"

namespace dl {
template cudaError_t entity_probs_t<__nv_bfloat16, 128>(const Args&, cudaStream_t);
template cudaError_t entity_probs_t<__nv_bfloat16, 64>(const Args&, cudaStream_t);
template cudaError_t pair_pass_t<__nv_bfloat16, 128>(const Args&, int, int, int, cudaStream_t);
template cudaError_t pair_pass_t<__nv_bfloat16, 64>(const Args&, int, int, int, cudaStream_t);
}  // namespace dl
