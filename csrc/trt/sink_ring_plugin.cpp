// TensorRT plugin (IPluginV3, TensorRT 10+) for the ONNX node livetalk::SinkRingAttention that
// `livetalk export --attention csrc` writes: the fused kernel of liblivetalk_sink_ring behind the
// node's eight inputs (q, k, v, k_cache, v_cache, cos, sin, seg) and its sink_cap attribute.
//
// TensorRT's ONNX parser falls back to the plugin registry for an op it does not know: creator
// name = the op type ("SinkRingAttention"), version "1", namespace "". Load the library with
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins=liblivetalk_trt_plugin.so): it exposes
// getCreators / setLoggerFinder. Build: cmake -DLIVETALK_TRT_PLUGIN=ON -DTensorRT_ROOT=...
#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "livetalk/sink_ring.h"

namespace livetalk {
namespace {

using namespace nvinfer1;

constexpr char const* kName = "SinkRingAttention";
constexpr char const* kVersion = "1";
constexpr int32_t kInputs = 8;  // q, k, v, k_cache, v_cache, cos, sin, seg

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess) {
    return 132;  // an H100/H200's count; only the split count (and the workspace) depends on it
  }
  return sms;
}

struct Shape {
  int batch, block_len, heads, head_dim, cache_len;
};

Shape shape_of(Dims const& q, Dims const& cache) {
  return Shape{static_cast<int>(q.d[0]), static_cast<int>(q.d[1]), static_cast<int>(q.d[2]),
               static_cast<int>(q.d[3]), static_cast<int>(cache.d[1])};
}

int splits_for(Shape const& s) { return lt_sink_ring_splits(s.batch, s.block_len, s.heads, s.cache_len, sm_count()); }

class SinkRingPlugin final : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild,
                             public IPluginV3OneRuntime {
 public:
  explicit SinkRingPlugin(int32_t sink_cap) : sink_cap_(sink_cap) {
    field_ = PluginField("sink_cap", &sink_cap_, PluginFieldType::kINT32, 1);
    fields_.nbFields = 1;
    fields_.fields = &field_;
  }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new (std::nothrow) SinkRingPlugin(sink_cap_); }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return ""; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
    return nbInputs == kInputs && nbOutputs == 1 ? 0 : -1;
  }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != kInputs) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != kInputs || nbOutputs != 1) return -1;
    outputs[0] = inputs[0];  // like q: (B, Nb, H, D)
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != kInputs || nbOutputs != 1 || pos < 0 || pos > kInputs) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 5 || pos == 6) return d.type == DataType::kFLOAT;  // RoPE tables
    if (pos == 7) return d.type == DataType::kINT32;               // seg
    if (pos == 0) return d.type == DataType::kHALF || d.type == DataType::kBF16;
    return d.type == inOut[0].desc.type;  // k, v, the cache and the output: q's type
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    if (nbInputs != kInputs) return 0;
    Shape s = shape_of(inputs[0].max, inputs[3].max);
    return lt_sink_ring_workspace_bytes(s.batch, s.block_len, s.heads, s.head_dim, splits_for(s));
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*,
                        int32_t nbOutputs) noexcept override {
    return nbInputs == kInputs && nbOutputs == 1 ? 0 : -1;
  }
  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    Shape s = shape_of(inputDesc[0].dims, inputDesc[3].dims);
    lt_sink_ring_args a{};
    a.q = inputs[0];
    a.k = inputs[1];
    a.v = inputs[2];
    a.k_cache = inputs[3];
    a.v_cache = inputs[4];
    a.cos = static_cast<float const*>(inputs[5]);
    a.sin = static_cast<float const*>(inputs[6]);
    a.seg = static_cast<int32_t const*>(inputs[7]);
    a.out = outputs[0];
    a.workspace = static_cast<float*>(workspace);
    a.batch = s.batch;
    a.block_len = s.block_len;
    a.heads = s.heads;
    a.head_dim = s.head_dim;
    a.cache_len = s.cache_len;
    a.sink_cap = sink_cap_;
    a.splits = splits_for(s);  // the count getWorkspaceSize sized the workspace for (same shapes, same GPU)
    a.dtype = inputDesc[0].type == DataType::kHALF ? LT_FP16 : LT_BF16;
    return lt_sink_ring_attention(&a, stream) == LT_OK ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fields_; }

 private:
  int32_t sink_cap_;
  PluginField field_;
  PluginFieldCollection fields_{};
};

class SinkRingCreator final : public IPluginCreatorV3One {
 public:
  SinkRingCreator() {
    field_ = PluginField("sink_cap", nullptr, PluginFieldType::kINT32, 1);
    fields_.nbFields = 1;
    fields_.fields = &field_;
  }
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    int64_t sink_cap = -1;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr || std::strcmp(f.name, "sink_cap") != 0 || f.data == nullptr || f.length < 1) continue;
      if (f.type == PluginFieldType::kINT32) sink_cap = *static_cast<int32_t const*>(f.data);
      if (f.type == PluginFieldType::kINT64) sink_cap = *static_cast<int64_t const*>(f.data);
    }
    if (sink_cap < 0 || sink_cap > INT32_MAX) return nullptr;  // the attribute is required
    return new (std::nothrow) SinkRingPlugin(static_cast<int32_t>(sink_cap));
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fields_; }
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return ""; }

 private:
  PluginField field_;
  PluginFieldCollection fields_{};
};

}  // namespace
}  // namespace livetalk

// The plugin library's entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder*) {}

extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static livetalk::SinkRingCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
