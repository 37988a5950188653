// Explicit instantiation of the attention kernels for one dtype and head size (one translation
// unit each, so the heavy template builds compile in parallel).
#include "attn_impl.cuh"

namespace dl {
template cudaError_t plain_attention_t<__nv_bfloat16, 128>(const Args&, cudaStream_t);
template cudaError_t edit_attention_t<__nv_bfloat16, 128>(const Args&, int, int, int, cudaStream_t);
}  // namespace dl
