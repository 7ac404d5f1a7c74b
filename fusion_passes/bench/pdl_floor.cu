// Floors of a chain of dependent kernels in CUDA-graph replay: what a router GEMM call
// costs before it does any arithmetic, in the setting of `fusion-passes bench router-gemm`
// (a graph of back-to-back launches, each one a programmatic dependent launch that waits
// for its predecessor first and releases its dependents last).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/pdl_floor fusion_passes/bench/pdl_floor.cu
//   /tmp/pdl_floor
//
// Cases, 256 threads a CTA, 512 launches a graph, median of 15 replays per launch:
//   * empty kernels: without PDL, with PDL, and with thread block clusters of 2 and 8 CTAs
//     doing 0, 1 or 2 cluster barriers (the first: every CTA of the cluster has started;
//     the second: a distributed-shared-memory store to rank 0 is visible);
//   * one round of 16-byte loads per thread (1, 2 or 4 loads in flight), a CTA reduction
//     and one store, L2-warm (the same buffer every call) or rotated through 256 MB (HBM),
//     without clusters and with clusters of 8 exchanging the CTA sums as above.
// Results and their reading: docs/benchmarks.md, "Floors of a dependent kernel chain".
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CUDA_OK(x)                                                     \
  do {                                                                 \
    cudaError_t e = (x);                                               \
    if (e != cudaSuccess) {                                            \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      exit(1);                                                         \
    }                                                                  \
  } while (0)

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_release() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void cl_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cl_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// stride_int4: int4s between the buffers of consecutive calls; rot: how many buffers rotate.
struct Case {
  const int4* in;
  float* out;
  long stride_int4;
  int rot;
  int pdl;
  int cluster;
  int loads;
  int barriers;
};

__global__ void __launch_bounds__(256) chain_kernel(Case p, int call) {
  __shared__ float red[8];
  __shared__ float recv[8];
  if (p.pdl) pdl_wait();
  float s = 0.f;
  if (p.loads) {
    const int4* base = p.in + (long)(call % p.rot) * p.stride_int4;
    for (int l = 0; l < p.loads; ++l) {
      int4 v = __ldg(base + ((long)l * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x);
      s += __int_as_float(v.x) + __int_as_float(v.y) + __int_as_float(v.z) + __int_as_float(v.w);
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      s = 0.f;
      for (int w = 0; w < 8; ++w) s += red[w];
    }
  }
  if (p.cluster > 1) {
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    if (p.barriers >= 1) {  // every CTA of the cluster has started
      cl_arrive();
      cl_wait();
    }
    if (p.barriers >= 2 && threadIdx.x == 0) {
      unsigned a = (unsigned)__cvta_generic_to_shared(&recv[rank]);
      unsigned r;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(0));
      asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(r), "f"(s) : "memory");
    }
    if (p.barriers >= 2) {
      cl_arrive();
      cl_wait();
    }
    if (p.barriers >= 2 && rank == 0 && threadIdx.x == 0) {
      s = 0.f;
      for (int i = 0; i < p.cluster; ++i) s += recv[i];
      p.out[blockIdx.x] = s;
    }
  } else if (threadIdx.x == 0 && p.loads) {
    p.out[blockIdx.x] = s;
  }
  __syncthreads();
  if (p.pdl) pdl_release();
}

static float run(const char* name, int grid, Case p, int calls, cudaStream_t st) {
  cudaLaunchAttribute at[2];
  int na = 0;
  if (p.pdl) {
    at[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  if (p.cluster > 1) {
    at[na].id = cudaLaunchAttributeClusterDimension;
    at[na].val.clusterDim.x = p.cluster;
    at[na].val.clusterDim.y = 1;
    at[na].val.clusterDim.z = 1;
    ++na;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(256);
  cfg.stream = st;
  cfg.attrs = at;
  cfg.numAttrs = na;
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; ++i) CUDA_OK(cudaLaunchKernelEx(&cfg, chain_kernel, p, i));
  CUDA_OK(cudaStreamEndCapture(st, &g));
  CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) CUDA_OK(cudaGraphLaunch(ge, st));
  std::vector<float> t;
  for (int r = 0; r < 15; ++r) {
    cudaEventRecord(a, st);
    CUDA_OK(cudaGraphLaunch(ge, st));
    cudaEventRecord(b, st);
    CUDA_OK(cudaEventSynchronize(b));
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 1e3f / calls);
  }
  std::sort(t.begin(), t.end());
  printf("%-44s grid=%4d cluster=%d barriers=%d pdl=%d loads=%d rot=%4d  %.3f us/call\n", name, grid, p.cluster,
         p.barriers, p.pdl, p.loads, p.rot, t[t.size() / 2]);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return t[t.size() / 2];
}

int main() {
  cudaStream_t st;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const long bytes = 256L << 20;
  int4* in;
  float* out;
  CUDA_OK(cudaMalloc(&in, bytes));
  CUDA_OK(cudaMemset(in, 0, bytes));
  CUDA_OK(cudaMalloc(&out, 1 << 20));
  const int calls = 512;
  for (int grid : {1, 64, 128}) {
    run("empty, no PDL", grid, Case{in, out, 0, 1, 0, 1, 0, 0}, calls, st);
    run("empty, PDL (wait first, release last)", grid, Case{in, out, 0, 1, 1, 1, 0, 0}, calls, st);
    if (grid < 8) continue;
    for (int cluster : {2, 8})
      for (int barriers : {0, 1, 2})
        run("empty, PDL, clusters", grid, Case{in, out, 0, 1, 1, cluster, 0, barriers}, calls, st);
  }
  // One round of 16-byte loads per thread (128 CTAs x 256 threads x 16 B = 512 KB a round),
  // a CTA reduction and one store: L2-warm (rot 1) and rotated through HBM.
  for (int loads : {1, 2, 4}) {
    const long per_call_int4 = 128L * 256 * loads;
    const int rot = (int)std::min<long>(calls, (bytes / 16) / per_call_int4);
    for (int rotv : {1, rot}) {
      run("loads + CTA reduce, PDL", 128, Case{in, out, per_call_int4, rotv, 1, 1, loads, 0}, calls, st);
      run("loads + CTA reduce + cluster 8 DSMEM, PDL", 128, Case{in, out, per_call_int4, rotv, 1, 8, loads, 2}, calls,
          st);
    }
  }
  return 0;
}
