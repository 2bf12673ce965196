// grid_sample (bilinear, zeros padding, align_corners=True) for NCHW fp32 images of 1 to 4 channels:
// the case the Triton kernel did not bring to the backward target (ostnet_fast/kernels/grid_sample.py).
//
// Why a kernel of its own: with random grids both passes are bound by scattered traffic to L2. On an NCHW
// image a tap's channels sit in planes H*W apart, so each (tap, channel) gather and each atomic is its own
// sector. Here the image is first packed channels-last, padded to 4 channels (one 16-byte vector a pixel):
// the forward and the grid grad gather one float4 per tap, and the input grad is scattered with one float4
// atomic per tap (sm_90's vector atomicAdd; scalar atomics on older GPUs) into a packed fp32 scratch that
// one last pass writes back as NCHW. The packed copy is made once and kept for the backward (grid_sample.py),
// and when the input grad is wanted the forward also zeroes that scratch: the backward needs no fill then.
// A thread owns one output pixel: its grid grad is reduced in registers, no atomics for it.
//
// Small images (the backward's image and grad sums fit in one block's shared memory: 64x64 with 3 channels
// is 96 KB), in batches big enough to fill the GPU, take a second set of kernels: one block per sample
// stages the NCHW planes in shared memory, gathers from there, and sums the input grad with shared-memory
// atomics before writing it once. No packed copy, no zero fill, no unpack, no L2 atomics.
//
// Maths and clamping are the Triton kernel's (_triton_utils.bilinear_taps), so the two paths agree to
// rounding. Built by setup.py as ostnet_fast._C when OSTNET_BUILD_CUDA=1; optional (README).
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <optional>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int kMaxChannels = 4;
constexpr int kThreads = 256;

struct Taps {
  int x0, y0;
  float wx0, wx1, wy0, wy1;
  bool m00, m01, m10, m11;  // zeros padding: a tap outside the image reads 0 and takes no grad
};

__device__ __forceinline__ Taps bilinear_taps(float2 g, int H, int W) {
  float ix = (g.x + 1.f) * 0.5f * (W - 1);
  float iy = (g.y + 1.f) * 0.5f * (H - 1);
  // Beyond one pixel outside every tap is invalid; the clamp keeps the float -> int conversion in range.
  ix = fminf(fmaxf(ix, -2.f), W + 1.f);
  iy = fminf(fmaxf(iy, -2.f), H + 1.f);
  const float x0f = floorf(ix), y0f = floorf(iy);
  Taps t;
  t.x0 = static_cast<int>(x0f);
  t.y0 = static_cast<int>(y0f);
  t.wx1 = ix - x0f;
  t.wy1 = iy - y0f;
  t.wx0 = 1.f - t.wx1;
  t.wy0 = 1.f - t.wy1;
  const bool vx0 = t.x0 >= 0 && t.x0 < W, vx1 = t.x0 + 1 >= 0 && t.x0 + 1 < W;
  const bool vy0 = t.y0 >= 0 && t.y0 < H, vy1 = t.y0 + 1 >= 0 && t.y0 + 1 < H;
  t.m00 = vy0 && vx0;
  t.m01 = vy0 && vx1;
  t.m10 = vy1 && vx0;
  t.m11 = vy1 && vx1;
  return t;
}

// The bilinear sum of a tap's 4 values with its weights.
__device__ __forceinline__ float blend(const Taps& t, float v00, float v01, float v10, float v11) {
  return t.wy0 * (t.wx0 * v00 + t.wx1 * v01) + t.wy1 * (t.wx0 * v10 + t.wx1 * v11);
}

__device__ __forceinline__ float4 scale(float4 v, float w) { return make_float4(v.x * w, v.y * w, v.z * w, v.w * w); }

__device__ __forceinline__ void atomic_add4(float4* p, float4 v, int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)C;
  atomicAdd(p, v);  // one vector atomic (sm_90+); the padding lane adds 0
#else
  float* q = reinterpret_cast<float*>(p);
  atomicAdd(q, v.x);
  if (C > 1) atomicAdd(q + 1, v.y);
  if (C > 2) atomicAdd(q + 2, v.z);
  if (C > 3) atomicAdd(q + 3, v.w);
#endif
}

__device__ __forceinline__ float4 load_pixel(const float4* p, bool valid) {
  return valid ? __ldg(p) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// A sample's top-left tap in the packed (B, H, W, 4) image, and its 4 taps (0 outside the image).
__device__ __forceinline__ int64_t packed_base(int64_t b, const Taps& t, int H, int W) {
  return b * static_cast<int64_t>(H) * W + static_cast<int64_t>(t.y0) * W + t.x0;
}

struct Corners {
  float4 v00, v01, v10, v11;
};

__device__ __forceinline__ Corners load_corners(const float4* packed, int64_t base, const Taps& t, int W) {
  return {load_pixel(packed + base, t.m00), load_pixel(packed + base + 1, t.m01),
          load_pixel(packed + base + W, t.m10), load_pixel(packed + base + W + 1, t.m11)};
}

// out[b, c, p] = sum of the 4 taps' weights times in[b, c, tap], read from the NCHW planes.
__global__ void forward_kernel(const float* __restrict__ in, const float2* __restrict__ grid, float* __restrict__ out,
                               int C, int H, int W, int64_t HWo, int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / HWo, p = i - b * HWo;
  const Taps t = bilinear_taps(grid[i], H, W);
  const int64_t plane = static_cast<int64_t>(H) * W;
  const float* src = in + b * C * plane + static_cast<int64_t>(t.y0) * W + t.x0;  // read only at valid taps
  float* dst = out + b * C * HWo + p;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) {
    if (c >= C) break;
    const float* s = src + c * plane;
    const float v00 = t.m00 ? __ldg(s) : 0.f;
    const float v01 = t.m01 ? __ldg(s + 1) : 0.f;
    const float v10 = t.m10 ? __ldg(s + W) : 0.f;
    const float v11 = t.m11 ? __ldg(s + W + 1) : 0.f;
    dst[c * HWo] = blend(t, v00, v01, v10, v11);
  }
}

// The same from the packed image: one float4 gather per tap. It also zeroes the backward's grad scratch
// (zero_n float4s, none if 0; the launch covers max(total, zero_n) threads): this kernel waits on L2
// gathers with DRAM bandwidth to spare, so the zeros cost less here than in a fill of their own.
__global__ void packed_forward_kernel(const float4* __restrict__ packed, const float2* __restrict__ grid,
                                      float* __restrict__ out, int C, int H, int W, int64_t HWo, int64_t total,
                                      float4* __restrict__ zero, int64_t zero_n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < zero_n) zero[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (i >= total) return;
  const int64_t b = i / HWo, p = i - b * HWo;
  const Taps t = bilinear_taps(grid[i], H, W);
  const Corners v = load_corners(packed, packed_base(b, t, H, W), t, W);
  const float r[kMaxChannels] = {
      blend(t, v.v00.x, v.v01.x, v.v10.x, v.v11.x), blend(t, v.v00.y, v.v01.y, v.v10.y, v.v11.y),
      blend(t, v.v00.z, v.v01.z, v.v10.z, v.v11.z), blend(t, v.v00.w, v.v01.w, v.v10.w, v.v11.w)};
  float* dst = out + b * C * HWo + p;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c)
    if (c < C) dst[c * HWo] = r[c];
}

// NCHW (B, C, H, W), C <= 4 -> (B, H, W, 4) with zeros in the padding lanes.
__global__ void pack_kernel(const float* __restrict__ in, float4* __restrict__ packed, int C, int64_t plane,
                            int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / plane, p = i - b * plane;
  const float* s = in + b * C * plane + p;
  float v[kMaxChannels] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c)
    if (c < C) v[c] = s[c * plane];
  packed[i] = make_float4(v[0], v[1], v[2], v[3]);
}

// (B, H, W, 4) -> NCHW (B, C, H, W): the scratch's first C lanes.
__global__ void unpack_kernel(const float4* __restrict__ packed, float* __restrict__ out, int C, int64_t plane,
                              int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / plane, p = i - b * plane;
  const float4 v = packed[i];
  const float lanes[kMaxChannels] = {v.x, v.y, v.z, v.w};
  float* d = out + b * C * plane + p;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c)
    if (c < C) d[c * plane] = lanes[c];
}

// The same, 4 pixels a thread (planes of a multiple of 4 pixels): 4 float4 loads, one float4 store per plane
// (H200, 8x3x256x256: 4.1 us against 4.5).
__global__ void unpack4_kernel(const float4* __restrict__ packed, float4* __restrict__ out, int C, int64_t plane4,
                               int64_t total4) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total4) return;
  const int64_t b = i / plane4, p = i - b * plane4;
  const float4* s = packed + 4 * i;
  const float4 p0 = s[0], p1 = s[1], p2 = s[2], p3 = s[3];
  float4* d = out + b * C * plane4 + p;
  d[0] = make_float4(p0.x, p1.x, p2.x, p3.x);
  if (C > 1) d[plane4] = make_float4(p0.y, p1.y, p2.y, p3.y);
  if (C > 2) d[2 * plane4] = make_float4(p0.z, p1.z, p2.z, p3.z);
  if (C > 3) d[3 * plane4] = make_float4(p0.w, p1.w, p2.w, p3.w);
}

// With g = dL/dout[p, c] and out = wy0 (wx0 v00 + wx1 v01) + wy1 (wx0 v10 + wx1 v11):
//   dL/din[tap, c] += g * w_tap  (float4 atomics into the packed scratch)
//   dL/dix = sum_c g (wy0 (v01 - v00) + wy1 (v11 - v10)),  dL/diy = sum_c g (wx0 (v10 - v00) + wx1 (v11 - v01))
// and dL/dgx = dL/dix (W - 1) / 2, dL/dgy = dL/diy (H - 1) / 2.
template <bool kInputGrad, bool kGridGrad>
__global__ void backward_kernel(const float* __restrict__ grad_out, const float4* __restrict__ packed,
                                const float2* __restrict__ grid, float4* __restrict__ grad_packed,
                                float2* __restrict__ grad_grid, int C, int H, int W, int64_t HWo, int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / HWo, p = i - b * HWo;
  const Taps t = bilinear_taps(grid[i], H, W);
  const float wx0 = t.wx0, wy0 = t.wy0;
  float gv[kMaxChannels] = {0.f, 0.f, 0.f, 0.f};
  const float* go = grad_out + b * C * HWo + p;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c)
    if (c < C) gv[c] = go[c * HWo];
  const float4 g = make_float4(gv[0], gv[1], gv[2], gv[3]);
  const int64_t base = packed_base(b, t, H, W);
  if (kGridGrad) {
    const Corners v = load_corners(packed, base, t, W);
    const float4 &v00 = v.v00, &v01 = v.v01, &v10 = v.v10, &v11 = v.v11;
    // padding lanes hold g = 0 and v = 0, so summing all 4 lanes is the sum over the C channels
    const float dix = g.x * (wy0 * (v01.x - v00.x) + t.wy1 * (v11.x - v10.x)) +
                      g.y * (wy0 * (v01.y - v00.y) + t.wy1 * (v11.y - v10.y)) +
                      g.z * (wy0 * (v01.z - v00.z) + t.wy1 * (v11.z - v10.z)) +
                      g.w * (wy0 * (v01.w - v00.w) + t.wy1 * (v11.w - v10.w));
    const float diy = g.x * (wx0 * (v10.x - v00.x) + t.wx1 * (v11.x - v01.x)) +
                      g.y * (wx0 * (v10.y - v00.y) + t.wx1 * (v11.y - v01.y)) +
                      g.z * (wx0 * (v10.z - v00.z) + t.wx1 * (v11.z - v01.z)) +
                      g.w * (wx0 * (v10.w - v00.w) + t.wx1 * (v11.w - v01.w));
    grad_grid[i] = make_float2(dix * (0.5f * (W - 1)), diy * (0.5f * (H - 1)));
  }
  if (kInputGrad) {
    if (t.m00) atomic_add4(grad_packed + base, scale(g, wy0 * wx0), C);
    if (t.m01) atomic_add4(grad_packed + base + 1, scale(g, wy0 * t.wx1), C);
    if (t.m10) atomic_add4(grad_packed + base + W, scale(g, t.wy1 * wx0), C);
    if (t.m11) atomic_add4(grad_packed + base + W + 1, scale(g, t.wy1 * t.wx1), C);
  }
}

// ---- Images that fit in shared memory (a 64x64 3-channel image is 48 KB): one block per sample stages the
// image's NCHW planes in shared memory; the forward and the grid grad gather from there, and the input grad
// is summed with shared-memory atomics, then written to the NCHW grad once: no pack, no zero-filled global
// scratch, no unpack, and none of the L2 atomics that bound the packed backward.

constexpr int kSharedThreads = 1024;

// dst[0:n] = src[0:n] by the whole block (float4 loads where both sides allow).
__device__ __forceinline__ void load_to_shared(float* dst, const float* __restrict__ src, int n) {
  if (n % 4 == 0 && reinterpret_cast<uintptr_t>(src) % alignof(float4) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int k = threadIdx.x; k < n / 4; k += blockDim.x) d4[k] = __ldg(s4 + k);
  } else {
    for (int k = threadIdx.x; k < n; k += blockDim.x) dst[k] = __ldg(src + k);
  }
}

// A tap's offset in a plane: (y0, x0) may lie one pixel outside, so the offset is read only at valid taps.
__device__ __forceinline__ int plane_offset(const Taps& t, int W) { return t.y0 * W + t.x0; }

// Block b: out[b] from in[b] staged in shared memory (C planes of H * W floats).
__global__ void __launch_bounds__(kSharedThreads) shared_forward_kernel(
    const float* __restrict__ in, const float2* __restrict__ grid, float* __restrict__ out, int C, int H, int W,
    int64_t HWo) {
  extern __shared__ float img[];
  const int64_t b = blockIdx.x;
  const int plane = H * W;
  load_to_shared(img, in + b * C * plane, C * plane);
  __syncthreads();
  const float2* g = grid + b * HWo;
  float* dst = out + b * C * HWo;
  for (int64_t p = threadIdx.x; p < HWo; p += blockDim.x) {
    const Taps t = bilinear_taps(g[p], H, W);
    const int o = plane_offset(t, W);
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= C) break;
      const float* s = img + c * plane;
      const float v00 = t.m00 ? s[o] : 0.f, v01 = t.m01 ? s[o + 1] : 0.f;
      const float v10 = t.m10 ? s[o + W] : 0.f, v11 = t.m11 ? s[o + W + 1] : 0.f;
      dst[c * HWo + p] = blend(t, v00, v01, v10, v11);
    }
  }
}

// Block b: the grads of sample b. Shared memory: the image (for the grid grad), then the input grad's sums.
template <bool kInputGrad, bool kGridGrad>
__global__ void __launch_bounds__(kSharedThreads) shared_backward_kernel(
    const float* __restrict__ grad_out, const float* __restrict__ in, const float2* __restrict__ grid,
    float* __restrict__ grad_in, float2* __restrict__ grad_grid, int C, int H, int W, int64_t HWo) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x;
  const int plane = H * W, n = C * plane;
  float* img = smem;
  float* acc = kGridGrad ? smem + n : smem;
  if (kGridGrad) load_to_shared(img, in + b * n, n);
  if (kInputGrad)
    for (int k = threadIdx.x; k < n; k += blockDim.x) acc[k] = 0.f;
  __syncthreads();
  const float2* g = grid + b * HWo;
  const float* go = grad_out + b * C * HWo;
  for (int64_t p = threadIdx.x; p < HWo; p += blockDim.x) {
    const Taps t = bilinear_taps(g[p], H, W);
    const int o = plane_offset(t, W);
    float dix = 0.f, diy = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= C) break;
      const float gc = go[c * HWo + p];
      if (kGridGrad) {  // see backward_kernel
        const float* s = img + c * plane;
        const float v00 = t.m00 ? s[o] : 0.f, v01 = t.m01 ? s[o + 1] : 0.f;
        const float v10 = t.m10 ? s[o + W] : 0.f, v11 = t.m11 ? s[o + W + 1] : 0.f;
        dix += gc * (t.wy0 * (v01 - v00) + t.wy1 * (v11 - v10));
        diy += gc * (t.wx0 * (v10 - v00) + t.wx1 * (v11 - v01));
      }
      if (kInputGrad) {
        float* a = acc + c * plane;
        if (t.m00) atomicAdd(a + o, gc * t.wy0 * t.wx0);
        if (t.m01) atomicAdd(a + o + 1, gc * t.wy0 * t.wx1);
        if (t.m10) atomicAdd(a + o + W, gc * t.wy1 * t.wx0);
        if (t.m11) atomicAdd(a + o + W + 1, gc * t.wy1 * t.wx1);
      }
    }
    if (kGridGrad) grad_grid[b * HWo + p] = make_float2(dix * (0.5f * (W - 1)), diy * (0.5f * (H - 1)));
  }
  if (kInputGrad) {
    __syncthreads();
    float* dst = grad_in + b * n;
    for (int k = threadIdx.x; k < n; k += blockDim.x) dst[k] = acc[k];
  }
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

// Argument checks. The Python side (ostnet_fast/kernels/cuda_ext.py) calls these functions only for inputs
// they accept, so these are backstops. Their messages are literals: on the GPU machine's image, an integer
// streamed into a TORCH_CHECK message crashed the process (segfault while formatting; seen twice, cause not
// established: likely the compiler's libstdc++ against the one loaded at run time).
void check_grid(const torch::Tensor& grid, const torch::Tensor& like, int64_t batch, const char* op) {
  TORCH_CHECK(grid.is_cuda() && grid.device() == like.device(), op, ": grid on another device");
  TORCH_CHECK(grid.dim() == 4 && grid.size(3) == 2 && grid.size(0) == batch, op,
              ": grid must be (B, H, W, 2) with the input's batch");
  TORCH_CHECK(grid.scalar_type() == torch::kFloat32 && grid.is_contiguous(), op, ": contiguous fp32 grid expected");
  // float2 loads of the grid need 8-byte alignment (a view at an odd offset is not)
  TORCH_CHECK(reinterpret_cast<uintptr_t>(grid.data_ptr()) % alignof(float2) == 0, op, ": grid not 8-byte aligned");
}

// NCHW-contiguous fp32 CUDA (B, C, H, W) with C in 1..4.
void check_image(const torch::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda() && input.dim() == 4, op, ": a (B, C, H, W) CUDA tensor expected");
  TORCH_CHECK(input.scalar_type() == torch::kFloat32, op, ": fp32 input expected");
  TORCH_CHECK(input.size(1) >= 1 && input.size(1) <= kMaxChannels, op, ": 1 to 4 channels expected");
  TORCH_CHECK(input.is_contiguous(), op, ": an NCHW-contiguous input expected");
  TORCH_CHECK(input.size(2) < (1 << 30) && input.size(3) < (1 << 30), op, ": image too large");
}

// A (B, H, W, 4) fp32 tensor made by pack().
void check_packed(const torch::Tensor& packed, const char* op) {
  TORCH_CHECK(packed.is_cuda() && packed.dim() == 4 && packed.size(3) == kMaxChannels &&
                  packed.scalar_type() == torch::kFloat32 && packed.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(packed.data_ptr()) % alignof(float4) == 0,
              op, ": packed must be the contiguous (B, H, W, 4) fp32 CUDA tensor grid_sample_pack returns");
  TORCH_CHECK(packed.size(1) < (1 << 30) && packed.size(2) < (1 << 30), op, ": image too large");
}

// NCHW fp32 (B, C, H, W), C in 1..4 -> (B, H, W, 4) fp32, zeros in the lanes past C.
torch::Tensor pack(const torch::Tensor& input) {
  check_image(input, "grid_sample_pack");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), plane = input.size(2) * input.size(3);
  auto packed = torch::empty({B, input.size(2), input.size(3), kMaxChannels}, input.options());
  if (packed.numel() == 0) return packed;
  // (one pixel a thread: a 4-pixel version, float4 loads from the planes, measured 7.5 us against 4.8 at
  // 8x3x256x256 on an H200, its 4 strided float4 stores per thread spread over 64 bytes a lane)
  pack_kernel<<<blocks_for(B * plane), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      input.data_ptr<float>(), reinterpret_cast<float4*>(packed.data_ptr<float>()), static_cast<int>(C), plane,
      B * plane);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

// The forwards' arguments checked, and their output: (B, C, H, W) NCHW fp32 for a (B, H, W, 2) grid.
torch::Tensor forward_output(const torch::Tensor& input, const torch::Tensor& grid, const char* op) {
  check_image(input, op);
  check_grid(grid, input, input.size(0), op);
  return torch::empty({input.size(0), input.size(1), grid.size(1), grid.size(2)}, input.options());
}

// input (B, C, H_in, W_in) NCHW, grid (B, H, W, 2) -> (B, C, H, W) NCHW fp32, gathering from the NCHW planes:
// for calls that need no backward (a pack would cost a pass over the image, and with smooth warps the
// planes' gathers coalesce anyway).
torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& grid) {
  auto out = forward_output(input, grid, "grid_sample_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t HWo = grid.size(1) * grid.size(2), total = B * HWo;
  if (total == 0) return out;
  forward_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      input.data_ptr<float>(), reinterpret_cast<const float2*>(grid.data_ptr<float>()), out.data_ptr<float>(),
      static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), HWo, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The backwards' grad_out: NCHW-contiguous fp32 (B, 1 to 4 channels, H, W) on like's device, H x W the grid's.
void check_grad_out(const torch::Tensor& grad_out, const torch::Tensor& like, const torch::Tensor& grid, const char* op) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.device() == like.device() && grad_out.dim() == 4 &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == torch::kFloat32 &&
                  grad_out.size(0) == grid.size(0) && grad_out.size(1) >= 1 && grad_out.size(1) <= kMaxChannels &&
                  grad_out.size(2) == grid.size(1) && grad_out.size(3) == grid.size(2),
              op, ": grad_out must be NCHW-contiguous fp32 (B, 1 to 4 channels, H, W) matching the grid");
}

// The backwards' results: (grad_input (B, C, H, W) NCHW fp32 or an empty tensor, grad_grid or an empty tensor),
// left uninitialised for kernels that write every element (grad_grid: each thread its pixel's). With nothing
// sampled or nothing to sample from, no kernel runs: zeros then.
std::vector<torch::Tensor> backward_outputs(const torch::Tensor& grid, int64_t C, int64_t H, int64_t W,
                                            bool need_input, bool need_grid) {
  const int64_t B = grid.size(0);
  const auto f32 = grid.options();
  torch::Tensor grad_input = need_input ? torch::empty({B, C, H, W}, f32) : torch::empty({0}, f32);
  torch::Tensor grad_grid = need_grid ? torch::empty_like(grid) : torch::empty({0}, f32);
  if (B * grid.size(1) * grid.size(2) == 0 || H * W == 0) {
    grad_input.zero_();
    grad_grid.zero_();
  }
  return {grad_input, grad_grid};
}

// A grad scratch for the packed backward: packed's shape, dtype and device, contiguous and float4-aligned,
// and not packed's memory (the kernels read the image while they write the scratch).
void check_scratch(const torch::Tensor& scratch, const torch::Tensor& packed, const char* op) {
  TORCH_CHECK(scratch.is_cuda() && scratch.device() == packed.device() && scratch.sizes() == packed.sizes() &&
                  scratch.scalar_type() == torch::kFloat32 && scratch.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(scratch.data_ptr()) % alignof(float4) == 0 &&
                  !scratch.is_alias_of(packed),
              op, ": grad_scratch must be a contiguous, 16-byte aligned fp32 CUDA tensor of packed's shape, "
              "apart from packed");
}

// packed (B, H_in, W_in, 4), grid (B, H, W, 2) -> (B, channels, H, W) NCHW fp32; zeroes grad_scratch if given
// (for the backward, which then needs no fill of its own).
torch::Tensor packed_forward(const torch::Tensor& packed, const torch::Tensor& grid, int64_t channels,
                             const std::optional<torch::Tensor>& grad_scratch) {
  const char* op = "grid_sample_packed_forward";
  check_packed(packed, op);
  check_grid(grid, packed, packed.size(0), op);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, op, ": 1 to 4 channels expected");
  if (grad_scratch) check_scratch(*grad_scratch, packed, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t B = packed.size(0), H = packed.size(1), W = packed.size(2);
  const int64_t HWo = grid.size(1) * grid.size(2), total = B * HWo;
  auto out = torch::empty({B, channels, grid.size(1), grid.size(2)}, packed.options());
  const int64_t zero_n = grad_scratch ? B * H * W : 0;
  if (total == 0 && zero_n == 0) return out;
  // enough threads for both jobs: an output much smaller than the image must not leave a few to zero it all
  const auto stream = c10::cuda::getCurrentCUDAStream();
  packed_forward_kernel<<<blocks_for(std::max(total, zero_n)), kThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(packed.data_ptr<float>()), reinterpret_cast<const float2*>(grid.data_ptr<float>()),
      out.data_ptr<float>(), static_cast<int>(channels), static_cast<int>(H), static_cast<int>(W), HWo, total,
      zero_n ? reinterpret_cast<float4*>(grad_scratch->data_ptr<float>()) : nullptr, zero_n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// -> (grad_input NCHW fp32 or an empty tensor, grad_grid or an empty tensor); the channel count is grad_out's.
// grad_scratch: a zeroed scratch from packed_forward, summed into (and spent) here; else one is zero-filled.
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& packed, const torch::Tensor& grid,
                                    bool need_input, bool need_grid, const std::optional<torch::Tensor>& grad_scratch) {
  const char* op = "grid_sample_packed_backward";
  check_packed(packed, op);
  check_grid(grid, packed, packed.size(0), op);
  if (grad_scratch) check_scratch(*grad_scratch, packed, op);
  check_grad_out(grad_out, packed, grid, op);
  const int64_t B = packed.size(0), C = grad_out.size(1), H = packed.size(1), W = packed.size(2);
  const c10::cuda::CUDAGuard guard(packed.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t HWo = grid.size(1) * grid.size(2), total = B * HWo, plane = H * W, pixels = B * plane;
  auto grads = backward_outputs(grid, C, H, W, need_input, need_grid);  // unpack writes every grad_input element
  if (total == 0 || pixels == 0 || !(need_input || need_grid)) return grads;
  const torch::Tensor &grad_input = grads[0], &grad_grid = grads[1];
  torch::Tensor grad_packed = !need_input ? torch::Tensor() : grad_scratch ? *grad_scratch : torch::zeros_like(packed);
  auto* grad_packed_ptr = need_input ? reinterpret_cast<float4*>(grad_packed.data_ptr<float>()) : nullptr;
  auto* grad_grid_ptr = need_grid ? reinterpret_cast<float2*>(grad_grid.data_ptr<float>()) : nullptr;
  const auto launch = [&](auto kernel) {
    kernel<<<blocks_for(total), kThreads, 0, stream>>>(
        grad_out.data_ptr<float>(), reinterpret_cast<const float4*>(packed.data_ptr<float>()),
        reinterpret_cast<const float2*>(grid.data_ptr<float>()), grad_packed_ptr, grad_grid_ptr, static_cast<int>(C),
        static_cast<int>(H), static_cast<int>(W), HWo, total);
  };
  if (need_input && need_grid) launch(backward_kernel<true, true>);
  else if (need_input) launch(backward_kernel<true, false>);
  else launch(backward_kernel<false, true>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_input) {
    const auto* sums = reinterpret_cast<const float4*>(grad_packed.data_ptr<float>());
    if (plane % 4 == 0)  // grad_input is a fresh allocation: aligned
      unpack4_kernel<<<blocks_for(pixels / 4), kThreads, 0, stream>>>(
          sums, reinterpret_cast<float4*>(grad_input.data_ptr<float>()), static_cast<int>(C), plane / 4, pixels / 4);
    else
      unpack_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(sums, grad_input.data_ptr<float>(),
                                                                  static_cast<int>(C), plane, pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grads;
}


// ---- Shared-memory kernels (one block per sample; the image, and for the backward its grad's sums, in
// shared memory).

// The most dynamic shared memory a block may use on this device (opt-in), queried once per device.
int64_t shared_limit(int device) {
  static std::array<int, 64> cache = [] { std::array<int, 64> a; a.fill(-1); return a; }();
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "grid_sample_shared: device index out of range");
  if (cache[device] < 0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[device] = bytes;
  }
  return cache[device];
}

// Bytes of shared memory for `planes` fp32 copies of one sample's C x H x W image.
int64_t shared_bytes(const torch::Tensor& input, int planes) {
  return planes * input.size(1) * input.size(2) * input.size(3) * static_cast<int64_t>(sizeof(float));
}

// The backward's image and grad sums (the larger need) fit in one block's shared memory on input's device.
bool shared_fits(const torch::Tensor& input) {
  check_image(input, "grid_sample_shared_fits");
  return shared_bytes(input, 2) <= shared_limit(input.get_device());
}

template <typename Kernel>
void allow_shared(Kernel kernel, int64_t bytes, int64_t limit, const char* op) {
  TORCH_CHECK(bytes <= limit, op, ": the image does not fit in shared memory (check grid_sample_shared_fits)");
  if (bytes > 48 * 1024)  // beyond the default a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

torch::Tensor shared_forward(const torch::Tensor& input, const torch::Tensor& grid) {
  const char* op = "grid_sample_shared_forward";
  auto out = forward_output(input, grid, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t HWo = grid.size(1) * grid.size(2);
  if (B * HWo == 0) return out;
  const int64_t bytes = shared_bytes(input, 1);
  allow_shared(shared_forward_kernel, bytes, shared_limit(input.get_device()), op);
  shared_forward_kernel<<<static_cast<unsigned int>(B), kSharedThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      input.data_ptr<float>(), reinterpret_cast<const float2*>(grid.data_ptr<float>()), out.data_ptr<float>(),
      static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), HWo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// -> (grad_input NCHW fp32 or an empty tensor, grad_grid or an empty tensor).
std::vector<torch::Tensor> shared_backward(const torch::Tensor& grad_out, const torch::Tensor& input,
                                           const torch::Tensor& grid, bool need_input, bool need_grid) {
  const char* op = "grid_sample_shared_backward";
  check_image(input, op);
  check_grid(grid, input, input.size(0), op);
  check_grad_out(grad_out, input, grid, op);
  TORCH_CHECK(grad_out.size(1) == input.size(1), op, ": grad_out must have the input's channels");
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t HWo = grid.size(1) * grid.size(2);
  auto grads = backward_outputs(grid, C, H, W, need_input, need_grid);  // the kernel writes every element from its sums
  if (B * HWo == 0 || H * W == 0 || !(need_input || need_grid)) return grads;
  const torch::Tensor &grad_input = grads[0], &grad_grid = grads[1];
  const int64_t bytes = shared_bytes(input, static_cast<int>(need_input) + static_cast<int>(need_grid));
  const int64_t limit = shared_limit(input.get_device());
  const auto launch = [&](auto kernel) {
    allow_shared(kernel, bytes, limit, op);
    kernel<<<static_cast<unsigned int>(B), kSharedThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        grad_out.data_ptr<float>(), input.data_ptr<float>(), reinterpret_cast<const float2*>(grid.data_ptr<float>()),
        need_input ? grad_input.data_ptr<float>() : nullptr,
        need_grid ? reinterpret_cast<float2*>(grad_grid.data_ptr<float>()) : nullptr, static_cast<int>(C),
        static_cast<int>(H), static_cast<int>(W), HWo);
  };
  if (need_input && need_grid) launch(shared_backward_kernel<true, true>);
  else if (need_input) launch(shared_backward_kernel<true, false>);
  else launch(shared_backward_kernel<false, true>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ostnet-fast CUDA C++ kernels (optional; the Triton kernels cover every op without them)";
  m.def("grid_sample_forward", &forward, "bilinear grid_sample, NCHW fp32 with 1-4 channels -> NCHW",
        py::arg("input"), py::arg("grid"));
  m.def("grid_sample_pack", &pack, "NCHW fp32 (B, C<=4, H, W) -> (B, H, W, 4) fp32, zero-padded", py::arg("input"));
  m.def("grid_sample_packed_forward", &packed_forward,
        "grid_sample of a packed image -> (B, channels, H, W); zeroes grad_scratch (packed's shape) if given",
        py::arg("packed"), py::arg("grid"), py::arg("channels"), py::arg("grad_scratch") = py::none());
  m.def("grid_sample_packed_backward", &backward,
        "its backward: (grad_input NCHW, grad_grid), each an empty tensor where not needed; sums into "
        "grad_scratch (zeroed by the forward) if given",
        py::arg("grad_out"), py::arg("packed"), py::arg("grid"), py::arg("need_input"), py::arg("need_grid"),
        py::arg("grad_scratch") = py::none());
  m.def("grid_sample_shared_fits", &shared_fits,
        "the image (B, C, H, W) and its grad's sums fit in one block's shared memory on its GPU", py::arg("input"));
  m.def("grid_sample_shared_forward", &shared_forward, "grid_sample from the image staged in shared memory -> NCHW",
        py::arg("input"), py::arg("grid"));
  m.def("grid_sample_shared_backward", &shared_backward,
        "its backward: (grad_input NCHW, grad_grid), each an empty tensor where not needed", py::arg("grad_out"),
        py::arg("input"), py::arg("grid"), py::arg("need_input"), py::arg("need_grid"));
}
