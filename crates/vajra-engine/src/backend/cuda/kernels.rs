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
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries; they call nothing in them.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    if !nvrtc {
        return Err("no NVRTC (libnvrtc.so.13) on the library path".into());
    }
    if !cublas {
        return Err("no cuBLAS (libcublas.so.13) on the library path".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("the CUDA driver reports no device".into()),
        Err(e) => Err(format!("the CUDA driver failed to start: {e}")),
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
        return Err(err("no NVRTC (libnvrtc.so.13) on the library path"));
    }
    let mut out = Vec::new();
    let mut texts = Vec::new();
    for (name, src) in KERNEL_SOURCES {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some((*name).into()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts)
            .map_err(|e| err(format!("NVRTC compiling kernels/{name} for {arch}: {e}")))?;
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
