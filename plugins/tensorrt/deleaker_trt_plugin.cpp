// DeLeakerAttention as a TensorRT 10 IPluginV3 (namespace "deleaker", version "2"), over the C ABI
// of the fused kernels (plugins/deleaker_attention/include/deleaker_attention.h, ABI v4).
//
// Inputs, outputs, their dtypes and the attribute fields come from deleaker_fields.h, the settings
// widths from deleaker_settings.h (via deleaker_attention.h): both generated from
// runtime/op_schema.py (`python -m deleaker.runtime.op_schema_c`). Strongly typed networks: out has q's type (fp16/bf16),
// history_out is float32. The per-sample settings (windows, knobs, rules), step and grid stay on
// the device: enqueue never synchronises, so the engine can be captured in a CUDA graph.
//
// Registration: the library exports TensorRT's plugin-library entry points getCreators and
// setLoggerFinder, so IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library,
// trtexec --dynamicPlugins) registers the creator on load.
#include <NvInferRuntime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "deleaker_attention.h"
#include "deleaker_fields.h"

#if !defined(NV_TENSORRT_MAJOR) || NV_TENSORRT_MAJOR < 10
#error "the DeLeakerAttention plugin needs TensorRT 10 or newer (IPluginV3)"
#endif
#if DL_ABI_VERSION < 5
#error "the DeLeakerAttention plugin needs deleaker_attention.h ABI v5 (per-sample settings arrays, the layout attribute)"
#endif

using namespace nvinfer1;

namespace deleaker_trt
{
namespace
{

// ---- logging through TensorRT's logger (set by the registry via setLoggerFinder) ----------------

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logMessage(ILogger::Severity severity, std::string const& msg) noexcept
{
    std::string const line = std::string(DL_TRT_PLUGIN_NAME ": ") + msg;
    ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        if (gLoggerFinder != nullptr)
        {
            logger = gLoggerFinder->findLogger();
        }
    }
    if (logger != nullptr)
    {
        logger->log(severity, line.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

void logError(std::string const& msg) noexcept
{
    logMessage(ILogger::Severity::kERROR, msg);
}

// ---- shapes -> dl_params_t ------------------------------------------------------------------------

bool isAttnType(DataType t)
{
    return t == DataType::kHALF || t == DataType::kBF16;
}

bool kindAccepts(int kind, DataType t, DataType qType)
{
    switch (kind)
    {
    case DL_KIND_ATTN: return isAttnType(t) && t == qType;
    case DL_KIND_F32: return t == DataType::kFLOAT;
    case DL_KIND_I64: return t == DataType::kINT64;
    default: return false;
    }
}

// Shapes of q [B, H, N, D], entity_tokens [B, E, T], history [B, E, I] into p; false (and why) if
// they do not fit the op. Unknown (-1) dimensions are accepted here and checked at enqueue.
bool fillShapes(dl_params_t& p, Dims const& q, Dims const& ent, Dims const& hist, DataType qType, std::string& why)
{
    if (q.nbDims != kDlInputRanks[DL_IN_Q] || ent.nbDims != kDlInputRanks[DL_IN_ENTITY_TOKENS]
        || hist.nbDims != kDlInputRanks[DL_IN_HISTORY])
    {
        why = "q must be [B, H, T+I, D], entity_tokens [B, E, T] and history [B, E, I]";
        return false;
    }
    p.dtype = qType == DataType::kBF16 ? DL_DTYPE_BF16 : DL_DTYPE_FP16;
    p.B = static_cast<int>(q.d[0]);
    p.H = static_cast<int>(q.d[1]);
    p.D = static_cast<int>(q.d[3]);
    p.E = static_cast<int>(ent.d[1]);
    p.T = static_cast<int>(ent.d[2]);
    p.I = static_cast<int>(hist.d[2]);
    int64_t const n = q.d[2];
    if (p.D >= 0 && p.D != 64 && p.D != 128)
    {
        why = "head dim D = " + std::to_string(p.D) + " is not supported (64 or 128)";
        return false;
    }
    if (p.E > DL_MAX_ENTITIES)
    {
        why = std::to_string(p.E) + " entity slots exceed the kernels' limit of " + std::to_string(DL_MAX_ENTITIES);
        return false;
    }
    if (n >= 0 && p.T >= 0 && p.I >= 0 && n != static_cast<int64_t>(p.T) + p.I)
    {
        why = "q has " + std::to_string(n) + " rows but T + I = " + std::to_string(p.T) + " + " + std::to_string(p.I);
        return false;
    }
    return true;
}

void contiguousStrides(dl_params_t const& p, int64_t* s)
{
    int64_t const n = static_cast<int64_t>(p.T) + p.I;
    s[2] = p.D;         // row
    s[1] = n * p.D;     // head
    s[0] = p.H * s[1];  // batch
}

} // namespace

// ---- the plugin -----------------------------------------------------------------------------------

class DeLeakerAttentionPlugin : public IPluginV3,
                                public IPluginV3OneCore,
                                public IPluginV3OneBuild,
                                public IPluginV3OneRuntime
{
public:
    explicit DeLeakerAttentionPlugin(int64_t const* attrs)
    {
        std::memcpy(mAttrs, attrs, sizeof(mAttrs));
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new DeLeakerAttentionPlugin(mAttrs);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return DL_TRT_PLUGIN_NAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return DL_TRT_PLUGIN_VERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return DL_TRT_PLUGIN_NAMESPACE; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return DL_NUM_OUTPUTS; }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS || nbOutputs != DL_NUM_OUTPUTS)
        {
            return -1;
        }
        for (int32_t i = 0; i < nbOutputs; ++i)
        {
            outputTypes[i] = kDlOutputKinds[i] == DL_KIND_ATTN ? inputTypes[DL_IN_Q] : DataType::kFLOAT;
        }
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS || nbOutputs != DL_NUM_OUTPUTS)
        {
            logError("expected " + std::to_string(DL_NUM_INPUTS) + " inputs, got " + std::to_string(nbInputs));
            return -1;
        }
        outputs[DL_OUT_OUT] = inputs[DL_IN_Q];                // [B, H, T+I, D]
        outputs[DL_OUT_HISTORY_OUT] = inputs[DL_IN_HISTORY];  // [B, E, I]
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS || nbOutputs != DL_NUM_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        int const kind = pos < nbInputs ? kDlInputKinds[pos] : kDlOutputKinds[pos - nbInputs];
        if (pos == DL_IN_Q)
        {
            return isAttnType(d.type);
        }
        return kindAccepts(kind, d.type, inOut[DL_IN_Q].desc.type);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS || nbOutputs != DL_NUM_OUTPUTS)
        {
            return -1;
        }
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (in[i].desc.dims.nbDims != kDlInputRanks[i])
            {
                logError(std::string("input ") + kDlInputNames[i] + " has rank " + std::to_string(in[i].desc.dims.nbDims)
                    + ", expected " + std::to_string(kDlInputRanks[i]));
                return -1;
            }
        }
        dl_params_t p;
        dl_params_init(&p);
        std::string why;
        if (!fillShapes(p, in[DL_IN_Q].desc.dims, in[DL_IN_ENTITY_TOKENS].desc.dims, in[DL_IN_HISTORY].desc.dims,
                in[DL_IN_Q].desc.type, why))
        {
            logError(why);
            return -1;
        }
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS)
        {
            return 0;
        }
        // the largest shapes of the profile: the workspace is allocated once for all of them
        dl_params_t p;
        dl_params_init(&p);
        std::string why;
        if (!fillShapes(p, inputs[DL_IN_Q].max, inputs[DL_IN_ENTITY_TOKENS].max, inputs[DL_IN_HISTORY].max,
                inputs[DL_IN_Q].desc.type, why))
        {
            logError(why);
            return 0;
        }
        return dl_workspace_size(&p);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != DL_NUM_INPUTS || nbOutputs != DL_NUM_OUTPUTS)
        {
            return -1;
        }
        dl_params_t p;
        dl_params_init(&p);
        std::string why;
        if (!fillShapes(p, in[DL_IN_Q].dims, in[DL_IN_ENTITY_TOKENS].dims, in[DL_IN_HISTORY].dims, in[DL_IN_Q].type, why))
        {
            logError(why);
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        (void) outputDesc;
        dl_params_t p;
        dl_params_init(&p);
        std::string why;
        if (!fillShapes(p, inputDesc[DL_IN_Q].dims, inputDesc[DL_IN_ENTITY_TOKENS].dims,
                inputDesc[DL_IN_HISTORY].dims, inputDesc[DL_IN_Q].type, why))
        {
            logError(why);
            return -1;
        }
        contiguousStrides(p, p.q_stride);
        contiguousStrides(p, p.k_stride);
        contiguousStrides(p, p.v_stride);
        contiguousStrides(p, p.o_stride);
        p.q = inputs[DL_IN_Q];
        p.k = inputs[DL_IN_K];
        p.v = inputs[DL_IN_V];
        p.out = outputs[DL_OUT_OUT];
        p.entity_tokens = static_cast<float const*>(inputs[DL_IN_ENTITY_TOKENS]);
        p.history = static_cast<float const*>(inputs[DL_IN_HISTORY]);
        p.history_out = static_cast<float*>(outputs[DL_OUT_HISTORY_OUT]);
        // read on the device: no host synchronisation, graph-capturable
        p.step = static_cast<int64_t const*>(inputs[DL_IN_STEP]);
        p.grid = static_cast<int64_t const*>(inputs[DL_IN_GRID]);
        p.windows = static_cast<int64_t const*>(inputs[DL_IN_WINDOWS]);
        p.knobs = static_cast<float const*>(inputs[DL_IN_KNOBS]);
        p.rules = static_cast<int64_t const*>(inputs[DL_IN_RULES]);
        p.block_offset = mAttrs[DL_ATTR_BLOCK_OFFSET];
        p.blocks_per_step = mAttrs[DL_ATTR_BLOCKS_PER_STEP];
        p.layout = mAttrs[DL_ATTR_LAYOUT];
        size_t const bytes = dl_workspace_size(&p);
        int const status = dl_launch(&p, workspace, bytes, stream);
        if (status != DL_OK)
        {
            std::string msg = std::string("dl_launch failed: ") + dl_status_string(status);
            if (status == DL_ERR_CUDA)
            {
                msg += std::string(" (") + dl_last_error() + ")";
            }
            logError(msg);
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mFields.clear();
        for (int i = 0; i < DL_NUM_ATTRS; ++i)
        {
            mFields.emplace_back(kDlAttrNames[i], &mAttrs[i], PluginFieldType::kINT64, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    int64_t mAttrs[DL_NUM_ATTRS];
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// ---- the creator ----------------------------------------------------------------------------------

namespace
{

// One integer attribute value of any integer PluginField type (the ONNX parser's and Python's
// choices differ); false if the field is not a single integer.
bool readInteger(PluginField const& f, int64_t& value)
{
    if (f.data == nullptr || f.length != 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(f.data); return true;
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(f.data); return true;
    default: return false;
    }
}

// Fields the ONNX node carries for the parser's plugin lookup; not attributes of the op.
bool isBindingField(char const* name)
{
    return std::strcmp(name, "plugin_namespace") == 0 || std::strcmp(name, "plugin_version") == 0;
}

} // namespace

class DeLeakerAttentionCreator : public IPluginCreatorV3One
{
public:
    DeLeakerAttentionCreator()
    {
        for (int i = 0; i < DL_NUM_ATTRS; ++i)
        {
            mFieldNames.emplace_back(kDlAttrNames[i], nullptr, PluginFieldType::kINT64, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            std::string const node = name != nullptr ? name : "?";
            int64_t attrs[DL_NUM_ATTRS];
            bool seen[DL_NUM_ATTRS] = {};
            for (int32_t j = 0; fc != nullptr && j < fc->nbFields; ++j)
            {
                PluginField const& f = fc->fields[j];
                if (f.name == nullptr || isBindingField(f.name))
                {
                    continue;
                }
                int i = 0;
                while (i < DL_NUM_ATTRS && std::strcmp(f.name, kDlAttrNames[i]) != 0)
                {
                    ++i;
                }
                if (i == DL_NUM_ATTRS)
                {
                    logError(node + ": unknown field '" + f.name + "' (op contract v" + std::to_string(DL_TRT_OP_VERSION)
                        + " has block_offset, blocks_per_step and layout only; re-export the model)");
                    return nullptr;
                }
                if (!readInteger(f, attrs[i]))
                {
                    logError(node + ": field '" + f.name + "' must be one integer");
                    return nullptr;
                }
                seen[i] = true;
            }
            if (!seen[DL_ATTR_LAYOUT])
            {
                attrs[DL_ATTR_LAYOUT] = 0; // a node exported before layouts: text_image
                seen[DL_ATTR_LAYOUT] = true;
            }
            for (int i = 0; i < DL_NUM_ATTRS; ++i)
            {
                if (!seen[i])
                {
                    logError(node + ": missing field '" + kDlAttrNames[i] + "'");
                    return nullptr;
                }
            }
            int64_t const bps = attrs[DL_ATTR_BLOCKS_PER_STEP];
            int64_t const off = attrs[DL_ATTR_BLOCK_OFFSET];
            if (bps < 1 || off < 0 || off >= bps)
            {
                logError(node + ": need 0 <= block_offset < blocks_per_step, got block_offset " + std::to_string(off)
                    + ", blocks_per_step " + std::to_string(bps));
                return nullptr;
            }
            if (attrs[DL_ATTR_LAYOUT] != 0)
            {
                // the fused kernels index the joint sequence as [text ; image]
                logError(node + ": the plugin takes layout 0 (text_image) only, got " + std::to_string(attrs[DL_ATTR_LAYOUT])
                    + "; run this model family with ONNX Runtime (the op's function body)");
                return nullptr;
            }
            return new DeLeakerAttentionPlugin(attrs);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return DL_TRT_PLUGIN_NAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return DL_TRT_PLUGIN_VERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return DL_TRT_PLUGIN_NAMESPACE; }

private:
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
};

} // namespace deleaker_trt

// ---- plugin-library entry points (IPluginRegistry::loadLibrary) ------------------------------------

extern "C" TENSORRTAPI IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static deleaker_trt::DeLeakerAttentionCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" TENSORRTAPI void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(deleaker_trt::gLoggerMutex);
    if (deleaker_trt::gLoggerFinder == nullptr && finder != nullptr)
    {
        deleaker_trt::gLoggerFinder = finder;
    }
}
