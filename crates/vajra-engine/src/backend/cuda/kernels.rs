//! The kernels: sources embedded from `kernels/`, compiled by NVRTC per architecture, loaded
//! into the device's modules.

use super::*;

/// Kernel sources, in the order they are compiled; each is prefixed with `common.cuh`.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    (
        "layers.cu",
        include_str!("../../../../../kernels/layers.cu"),
    ),
    (
        "attention.cu",
        include_str!("../../../../../kernels/attention.cu"),
    ),
    (
        "sample.cu",
        include_str!("../../../../../kernels/sample.cu"),
    ),
];
const COMMON: &str = include_str!("../../../../../kernels/common.cuh");

/// Whether a CUDA device can be used, and if not, why (missing driver library, NVRTC or
/// cuBLAS, or no device).
///
/// # Errors
/// A message saying what is missing.
pub fn probe() -> std::result::Result<(), CudaError> {
    // SAFETY: these only try to dlopen the libraries; they call nothing in them.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(CudaError::Unavailable(
            "no CUDA driver (libcuda.so) on this machine".into(),
        ));
    }
    if !nvrtc {
        return Err(CudaError::Unavailable(
            "no NVRTC (libnvrtc.so.13) on the library path".into(),
        ));
    }
    if !cublas {
        return Err(CudaError::Unavailable(
            "no cuBLAS (libcublas.so.13) on the library path".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(CudaError::Unavailable(
            "the CUDA driver reports no device".into(),
        )),
        Err(e) => Err(CudaError::Unavailable(format!(
            "the CUDA driver failed to start: {e}"
        ))),
    }
}

/// Compiles every kernel source to PTX for `arch` (e.g. `sm_90`).
///
/// # Errors
/// NVRTC is missing, or a source fails to compile (the log names the file and line).
pub fn compile_kernels(arch: &'static str) -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    /// PTX text of every source, per architecture.
    type PtxCache = HashMap<&'static str, Vec<(&'static str, String)>>;
    static CACHE: OnceLock<Mutex<PtxCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().expect("ptx cache lock").get(arch) {
        return Ok(hit
            .iter()
            .map(|(n, src)| (*n, cudarc::nvrtc::Ptx::from_src(src.clone())))
            .collect());
    }
    // SAFETY: only dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(err(CudaError::Unavailable(
            "no NVRTC (libnvrtc.so.13) on the library path".into(),
        )));
    }
    let mut out = Vec::new();
    let mut texts = Vec::new();
    for (name, src) in KERNEL_SOURCES {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some((*name).into()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts).map_err(
            |e| {
                err(CudaError::Compile {
                    file: name,
                    arch,
                    message: e.to_string(),
                })
            },
        )?;
        texts.push((*name, ptx.to_src()));
        out.push((*name, ptx));
    }
    cache.lock().expect("ptx cache lock").insert(arch, texts);
    Ok(out)
}

pub(super) struct Kernels {
    pub(super) embed: CudaFunction,
    pub(super) add_rms_norm: CudaFunction,
    pub(super) rms_norm_rows: CudaFunction,
    pub(super) add_bias: CudaFunction,
    pub(super) rope: CudaFunction,
    pub(super) kv_write: CudaFunction,
    /// `rope` and `kv_write` in one launch (v2).
    pub(super) rope_kv_write: CudaFunction,
    pub(super) silu_mul: CudaFunction,
    pub(super) silu_mul8: CudaFunction,
    pub(super) fill_uniform: CudaFunction,
    pub(super) paged_attention_scalar: CudaFunction,
    /// `paged_decode_<d>` for each of MMA_HEAD_DIMS, in order (one K/V tile per warp).
    pub(super) paged_decode: Vec<CudaFunction>,
    /// `paged_decode2_<d>`: the same with the next tile's copy in flight (two stages).
    pub(super) paged_decode2: Vec<CudaFunction>,
    /// `flash_prefill_<d>` for each of MMA_HEAD_DIMS, in order.
    pub(super) flash_prefill: Vec<CudaFunction>,
    pub(super) attention_combine: CudaFunction,
    pub(super) gather_kv: CudaFunction,
    pub(super) causal_softmax: CudaFunction,
    pub(super) argmax_rows: CudaFunction,
    pub(super) sample_rows: CudaFunction,
}

impl Kernels {
    /// Compiles (or takes from the process's cache) every kernel for `arch`, loads the modules
    /// into `ctx` and looks up each kernel; on sm_80+ lets the two-stage decode kernels use
    /// more than 48 KB of shared memory.
    pub(super) fn load(ctx: &Arc<CudaContext>, arch: &'static str, major: i32) -> Result<Self> {
        let mut funcs = HashMap::new();
        for (name, ptx) in compile_kernels(arch)? {
            let module = ctx.load_module(ptx).map_err(|source| {
                err(CudaError::Load {
                    what: format!("kernels/{name}"),
                    source,
                })
            })?;
            for f in kernel_names(name) {
                let func = module.load_function(f).map_err(|source| {
                    err(CudaError::Load {
                        what: format!("kernel {f}"),
                        source,
                    })
                })?;
                funcs.insert(*f, func);
            }
        }
        let take = |n: &str| funcs.get(n).cloned().expect("every kernel name is loaded");
        let per_head_dim = |prefix: &str| {
            MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("{prefix}_{d}")))
                .collect::<Vec<_>>()
        };
        let k = Kernels {
            embed: take("embed"),
            add_rms_norm: take("add_rms_norm"),
            rms_norm_rows: take("rms_norm_rows"),
            add_bias: take("add_bias"),
            rope: take("rope"),
            kv_write: take("kv_write"),
            rope_kv_write: take("rope_kv_write"),
            silu_mul: take("silu_mul"),
            silu_mul8: take("silu_mul8"),
            fill_uniform: take("fill_uniform"),
            paged_attention_scalar: take("paged_attention_scalar"),
            paged_decode: per_head_dim("paged_decode"),
            paged_decode2: per_head_dim("paged_decode2"),
            flash_prefill: per_head_dim("flash_prefill"),
            attention_combine: take("attention_combine"),
            gather_kv: take("gather_kv"),
            causal_softmax: take("causal_softmax"),
            argmax_rows: take("argmax_rows"),
            sample_rows: take("sample_rows"),
        };
        if major >= 8 {
            // Two-stage decode tiles exceed the 48 KB of shared memory a block gets by default.
            for (f, d) in k.paged_decode2.iter().zip(MMA_HEAD_DIMS) {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    decode_smem_bytes(d, 2) as i32,
                )
                .map_err(err)?;
            }
        }
        Ok(k)
    }
}

pub(super) fn kernel_names(file: &str) -> &'static [&'static str] {
    match file {
        "layers.cu" => &[
            "embed",
            "add_rms_norm",
            "rms_norm_rows",
            "add_bias",
            "rope",
            "kv_write",
            "rope_kv_write",
            "silu_mul",
            "silu_mul8",
            "fill_uniform",
        ],
        "attention.cu" => &[
            "paged_attention_scalar",
            "paged_decode_16",
            "paged_decode_32",
            "paged_decode_64",
            "paged_decode_128",
            "paged_decode2_16",
            "paged_decode2_32",
            "paged_decode2_64",
            "paged_decode2_128",
            "flash_prefill_16",
            "flash_prefill_32",
            "flash_prefill_64",
            "flash_prefill_128",
            "attention_combine",
            "gather_kv",
            "causal_softmax",
        ],
        "sample.cu" => &["argmax_rows", "sample_rows"],
        _ => &[],
    }
}
