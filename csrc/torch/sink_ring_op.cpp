// The CUDA kernel of `livetalk::sink_ring_attention` for torch (the extension setup.py builds as
// livetalk_cli._csrc on machines with a CUDA torch and toolkit). The op's schema, its reference
// (every device), fake and ONNX forms live in livetalk_cli/kernels/sink_ring.py; importing this
// module adds the kernel under the CUDA dispatch key, which takes precedence over the reference.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "livetalk/sink_ring.h"

namespace {

at::Tensor sink_ring_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos,
                                    const at::Tensor& sin, const at::Tensor& seg, int64_t sink_cap) {
  const char* op = "livetalk::sink_ring_attention (csrc kernel): ";
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op, "takes fp16 or bf16, got ",
              q.scalar_type());
  for (const at::Tensor* t : {&k, &v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, "q, k, v and the cache must share a dtype");
  }
  for (const at::Tensor* t : {&q, &k, &v, &k_cache, &v_cache, &cos, &sin, &seg}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(), op, "every input must be on ", q.device());
  }
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, "q, k, v must be (B, Nb, H, D)");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == q.size(0) &&
                  k_cache.size(2) == q.size(2) && k_cache.size(3) == q.size(3),
              op, "k_cache, v_cache must be (B, Np, H, D)");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(0) == q.size(1) &&
                  cos.size(1) == q.size(3) / 2 && sin.sizes() == cos.sizes(),
              op, "cos, sin must be float32 (Nb, D/2)");
  TORCH_CHECK(seg.scalar_type() == at::kInt && seg.numel() == 2, op, "seg must be int32 (2,)");
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor kcc = k_cache.contiguous(), vcc = v_cache.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous(), segc = seg.contiguous();
  at::Tensor out = at::empty_like(qc);
  const int batch = static_cast<int>(q.size(0)), block_len = static_cast<int>(q.size(1));
  const int heads = static_cast<int>(q.size(2)), head_dim = static_cast<int>(q.size(3));
  const int cache_len = static_cast<int>(k_cache.size(1));
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()) == cudaSuccess, op,
              "cannot read the device's SM count");
  const int splits = lt_sink_ring_splits(batch, block_len, heads, cache_len, sms);
  const size_t ws_bytes = lt_sink_ring_workspace_bytes(batch, block_len, heads, head_dim, splits);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, q.options().dtype(at::kFloat));
  lt_sink_ring_args a{};
  a.q = qc.data_ptr();
  a.k = kc.data_ptr();
  a.v = vc.data_ptr();
  a.k_cache = kcc.data_ptr();
  a.v_cache = vcc.data_ptr();
  a.cos = cc.data_ptr<float>();
  a.sin = sc.data_ptr<float>();
  a.seg = segc.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.workspace = ws_bytes > 0 ? ws.data_ptr<float>() : nullptr;
  a.batch = batch;
  a.block_len = block_len;
  a.heads = heads;
  a.head_dim = head_dim;
  a.cache_len = cache_len;
  a.sink_cap = static_cast<int>(sink_cap);
  a.splits = splits;
  a.dtype = q.scalar_type() == at::kHalf ? LT_FP16 : LT_BF16;
  const lt_status rc = lt_sink_ring_attention(&a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(rc == LT_OK, op, lt_sink_ring_status_string(rc));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(livetalk, CUDA, m) { m.impl("sink_ring_attention", &sink_ring_attention_cuda); }

// A Python module with no functions: importing it loads the library and runs the registration.
extern "C" PyObject* PyInit__csrc(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_csrc", "livetalk csrc kernels (torch.ops.livetalk)", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
